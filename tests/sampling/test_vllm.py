"""``data.sampler: vllm``: the vLLM engine against sdlit's own sampler, weight sync with and without LoRA, the
sampled distribution, and 2-step fits. Runs where vLLM is installed (``make test-vllm``); skipped elsewhere."""

from __future__ import annotations

import pytest
import torch

from sdlit.sampling import sample_responses
from sdlit.settings import SamplingSettings, VLLMSettings

from conftest import save_wide_model, write_config

vllm = pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [40, 41, 42, 43, 44, 45, 46]]
GREEDY = SamplingSettings(temperature=0.0, max_new_tokens=16)


@pytest.fixture(scope="module")
def vllm_model_dir(tmp_path_factory) -> str:
    """A 2-layer random Llama whose head size (32) vLLM's CPU attention supports, with the tests' tokenizer."""
    return save_wide_model(tmp_path_factory.mktemp("vllm-llama"))


@pytest.fixture(scope="module")
def tokenizer(vllm_model_dir):
    from sdlit.models import load_tokenizer

    return load_tokenizer(vllm_model_dir)


def engine(model_dir, lora_rank=None):
    from sdlit.sampling.vllm_engine import engine_for

    return engine_for(model_dir, lora_rank, VLLMSettings(cpu_kv_cache_gib=1, max_model_len=256), None)


def both_samplers(model, tokenizer, vllm_engine, version, settings=GREEDY):
    vllm_engine.sync(model, version)
    ours = sample_responses(model, tokenizer, PROMPTS, n=2, settings=settings, sampler="static_cache")
    theirs = sample_responses(model, tokenizer, PROMPTS, n=2, settings=settings, sampler="vllm", engine=vllm_engine)
    return ours, theirs


@torch.no_grad()
def perturb(params) -> None:
    generator = torch.Generator().manual_seed(1)
    for param in params:
        param.add_(0.05 * torch.randn(param.shape, generator=generator))


def test_greedy_samples_equal_sdlits_and_follow_changed_weights(vllm_model_dir, tokenizer):
    from sdlit.models import load_model

    model = load_model(vllm_model_dir)
    plain = engine(vllm_model_dir)
    ours, theirs = both_samplers(model, tokenizer, plain, 0)
    assert theirs == ours and len({tuple(r) for r in ours}) > 1
    perturb(model.parameters())  # a full-weight update: pushed into the engine in place
    changed, theirs = both_samplers(model, tokenizer, plain, 1)
    assert theirs == changed and changed != ours


def test_lora_adapter_versions_are_sampled_exactly(vllm_model_dir, tokenizer):
    from sdlit.models import LoraSettings, add_lora, load_model

    model = add_lora(load_model(vllm_model_dir), LoraSettings(r=8, alpha=16))
    perturb(p for n, p in model.named_parameters() if "lora_B" in n)  # a trained adapter: B away from zero
    adapted = engine(vllm_model_dir, lora_rank=8)
    first, theirs = both_samplers(model, tokenizer, adapted, 0)
    assert theirs == first
    perturb(p for n, p in model.named_parameters() if "lora_" in n)
    second, theirs = both_samplers(model, tokenizer, adapted, 1)
    assert theirs == second and second != first
    assert adapted.lora_request.lora_int_id == 2


def test_sampling_follows_the_models_distribution(vllm_model_dir, tokenizer):
    from sdlit.models import load_model

    model = load_model(vllm_model_dir)
    plain = engine(vllm_model_dir)
    plain.sync(model, 100)
    torch.manual_seed(0)
    settings = SamplingSettings(temperature=0.7, max_new_tokens=1)
    rows = sample_responses(model, tokenizer, [PROMPTS[0]], n=4000, settings=settings, sampler="vllm",
                            engine=plain)
    counts = torch.bincount(torch.tensor([r[0] for r in rows]), minlength=model.config.vocab_size).float()
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([PROMPTS[0]])).logits[0, -1] / 0.7, dim=-1)
    assert (counts / len(rows) - probs).abs().max() < 0.03
    torch.manual_seed(0)  # the seed comes from torch's random state: a seeded run samples the same
    again = sample_responses(model, tokenizer, [PROMPTS[0]], n=4000, settings=settings, sampler="vllm",
                             engine=plain)
    assert again == rows


def test_lora_rank_above_vllms_largest_is_refused():
    from sdlit.sampling.vllm_engine import lora_rank_limit

    assert lora_rank_limit(4) == 8 and lora_rank_limit(16) == 16 and lora_rank_limit(100) == 128
    with pytest.raises(ValueError, match="model.lora.r"):
        lora_rank_limit(1024)


@pytest.mark.parametrize("objective,callbacks,n", [("self_distillation", ["ReferenceSolution"], 1),
                                                   ("grpo", ["BinaryReward"], 2),
                                                   ("self_distillation", ["StepCritique"], 1)])
def test_two_step_fit_with_the_vllm_sampler(tmp_path, vllm_model_dir, objective, callbacks, n):
    from sdlit.cli import run_cli

    config = write_config(tmp_path, vllm_model_dir, objective=objective, callbacks=callbacks, rollouts_per_problem=n,
                          extra_trainer={"limit_val_batches": None, "val_check_interval": 2})
    cli = run_cli(["fit", "--config", config, "--data.sampler", "vllm", "--data.vllm.cpu_kv_cache_gib", "1",
                   "--data.vllm.max_model_len", "512", "--model.lora.r", "8"])
    assert cli.trainer.global_step == 2
    metrics = cli.trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and "val/avg@3" in metrics


def test_held_out_evaluation_through_vllm_equals_sdlits_sampler(tmp_path, vllm_model_dir):
    from sdlit.cli import run_cli

    metrics = {}
    for sampler in ("static_cache", "vllm"):
        folder = tmp_path / sampler
        folder.mkdir()
        config = write_config(folder, vllm_model_dir, evaluation={"temperature": 0.0, "max_new_tokens": 12},
                              extra_trainer={"limit_val_batches": None})
        cli = run_cli(["validate", "--config", config, "--data.sampler", sampler, "--model.lora.r", "8",
                       "--data.evaluation.num_problems", "4"], )
        metrics[sampler] = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    assert metrics["vllm"] == metrics["static_cache"] and "val/mean_length" in metrics["vllm"]


@pytest.mark.slow
def test_packaged_smollm2_greedy_samples_and_tied_head_after_a_weight_update():
    """SmolLM2 ties its output head to the embeddings: after a full-weight push the engine's copy of the head must
    follow (vLLM's CPU backend keeps a packed copy that a reload does not refresh)."""
    from sdlit.models import SMOLLM2_ALIAS, load_model, load_tokenizer, resolve_model_path
    from sdlit.prompts import student_prompt_ids

    tokenizer = load_tokenizer(SMOLLM2_ALIAS)
    model = load_model(SMOLLM2_ALIAS)
    plain = engine(resolve_model_path(SMOLLM2_ALIAS))
    questions = ["What is 12 + 30?", "Tom has 3 apples and buys 4 more. How many apples does he have?"]
    prompts = [student_prompt_ids(tokenizer, q) for q in questions]
    settings = SamplingSettings(temperature=0.0, max_new_tokens=24)
    for version in (0, 1):
        if version:
            with torch.no_grad():  # a full-weight update of the tied embedding / head and one layer
                model.get_input_embeddings().weight.mul_(1.05)
                model.model.layers[0].mlp.down_proj.weight.mul_(0.9)
        plain.sync(model, version)
        ours = sample_responses(model, tokenizer, prompts, n=1, settings=settings, sampler="static_cache")
        theirs = sample_responses(model, tokenizer, prompts, n=1, settings=settings, sampler="vllm", engine=plain)
        assert theirs == ours, version
        assert engine_logprobs(plain, prompts[0], 8) == pytest.approx(hf_logprobs(model, prompts[0], 8), abs=1e-3)


def engine_logprobs(vllm_engine, prompt: list[int], tokens: int) -> list[float]:
    """The engine's log-probs of its own greedy tokens."""
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=tokens, logprobs=0)
    sample = vllm_engine.llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)[0].outputs[0]
    return [step[token].logprob for token, step in zip(sample.token_ids, sample.logprobs, strict=True)]


@torch.no_grad()
def hf_logprobs(model, prompt: list[int], tokens: int) -> list[float]:
    """The model's log-probs of its greedy tokens."""
    ids, out = list(prompt), []
    for _ in range(tokens):
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), dim=-1)
        token = int(logprobs.argmax())
        out.append(float(logprobs[token]))
        ids.append(token)
    return out


def test_sigkill_then_resume_rebuilds_the_engine_on_the_restored_weights(tmp_path, vllm_model_dir):
    """A run killed after step 2 and resumed with --ckpt_path last starts a new engine, pushes the restored adapter,
    and samples what an uninterrupted run samples (same rollouts, same losses)."""
    import json
    import signal
    import subprocess
    import sys

    from conftest import subprocess_env

    def run(folder, *callbacks, resume=False):
        checkpoint = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                      "init_args": {"dirpath": str(folder / "ckpt"), "save_last": True, "save_top_k": 0,
                                    "every_n_train_steps": 1, "enable_version_counter": False}}
        record = {"class_path": "probes.StepRecorder", "init_args": {"path": str(folder / "steps.jsonl")}}
        config = write_config(folder, vllm_model_dir, callbacks=["ReferenceSolution", checkpoint, record, *callbacks],
                              extra_trainer={"enable_checkpointing": True, "max_steps": 4})
        cmd = [sys.executable, "-m", "sdlit.cli", "fit", "--config", config, "--data.sampler", "vllm",
               "--data.sampling.temperature", "1.0", "--model.lora.r", "8", *(["--ckpt_path", "last"] * resume)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=folder, env=subprocess_env())

    def steps(folder):
        return {r["step"]: r for r in map(json.loads, (folder / "steps.jsonl").read_text().splitlines())}

    straight, crash = tmp_path / "straight", tmp_path / "crash"
    straight.mkdir(), crash.mkdir()
    assert run(straight).returncode == 0
    killed = run(crash, {"class_path": "probes.KillAtStep", "init_args": {"step": 2}})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = run(crash, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, got = steps(straight), steps(crash)
    assert sorted(got) == [1, 2, 3, 4]
    for step in (3, 4):
        assert got[step]["responses"] == expected[step]["responses"], step
        assert abs(got[step]["loss"] - expected[step]["loss"]) < 1e-6, step


def test_ddp_ranks_each_run_their_own_engine(tmp_path, vllm_model_dir):
    import csv
    import subprocess
    import sys

    from conftest import subprocess_env

    config = write_config(tmp_path, vllm_model_dir, callbacks=["ReferenceSolution"],
                          extra_trainer={"limit_val_batches": None, "val_check_interval": 2})
    cmd = [sys.executable, "-m", "sdlit.cli", "fit", "--config", config, "--trainer.devices", "2",
           "--trainer.strategy", "ddp", "--data.sampler", "vllm", "--data.vllm.max_model_len", "512",
           "--model.lora.r", "8", "--trainer.log_every_n_steps", "1", "--trainer.logger", "CSVLogger",
           "--trainer.logger.save_dir", str(tmp_path / "logs")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=subprocess_env())
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Starting with 2 processes" in done.stdout + done.stderr
    assert (done.stdout + done.stderr).count("Resolved architecture: LlamaForCausalLM") == 2  # an engine per rank
    rows = list(csv.DictReader(open(next((tmp_path / "logs").rglob("metrics.csv")))))
    assert len([r for r in rows if r.get("train/loss")]) == 2 and any(r.get("val/avg@3") for r in rows)


@pytest.mark.parametrize("lora", [True, False])
def test_after_two_optimizer_steps_the_engine_samples_the_trained_weights(tmp_path, vllm_model_dir, tokenizer, lora):
    from sdlit.cli import run_cli

    config = write_config(tmp_path, vllm_model_dir, callbacks=["ReferenceSolution"], lora=lora)
    args = ["fit", "--config", config, "--data.sampler", "vllm", "--data.vllm.max_model_len", "512",
            "--model.learning_rate", "0.01"]
    cli = run_cli(args + (["--model.lora.r", "8"] if lora else []))
    module, data = cli.model, cli.datamodule
    assert module.global_step == 2
    trained = data.engine(module)
    assert trained.synced_version == 1  # the last rollouts came from the weights after step 1
    trained.sync(module.model, module.global_step)  # the weights after step 2
    module.model.eval()
    ours = sample_responses(module.model, tokenizer, PROMPTS, n=1, settings=GREEDY, sampler="static_cache")
    theirs = sample_responses(module.model, tokenizer, PROMPTS, n=1, settings=GREEDY, sampler="vllm", engine=trained)
    assert theirs == ours


def test_a_model_vllm_cannot_serve_stops_before_training(tmp_path, tiny_model_dir):
    """The tests' other tiny Llama has head size 8, which vLLM's CPU attention does not take."""
    from sdlit.cli import run_cli

    config = write_config(tmp_path, tiny_model_dir, callbacks=["ReferenceSolution"])
    with pytest.raises(ValueError, match="vLLM cannot serve model"):
        run_cli(["fit", "--config", config, "--data.sampler", "vllm"])


@pytest.mark.parametrize("lora", [True, False])
def test_sharded_solver_pushes_gathered_weights_into_each_ranks_engine(tmp_path, vllm_model_dir, lora):
    """FSDP2 on 2 processes: each rank's engine gets the whole weights (gathered tensor by tensor) or the whole
    adapter, and samples the greedy tokens of the sharded solver."""
    import json
    import subprocess
    import sys

    from conftest import subprocess_env

    probe = {"class_path": "probes.EngineProbe", "init_args": {"out_dir": str(tmp_path)}}
    config = write_config(tmp_path, vllm_model_dir, callbacks=["ReferenceSolution", probe], lora=lora,
                          teacher="base" if lora else "ema")
    cmd = [sys.executable, "-m", "sdlit.cli", "fit", "--config", config, "--trainer.devices", "2",
           "--trainer.strategy", "fsdp2", "--data.sampler", "vllm", "--data.vllm.max_model_len", "512",
           *(["--model.lora.r", "8"] if lora else [])]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=subprocess_env())
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        record = json.loads((tmp_path / f"engine-rank{rank}.json").read_text())
        assert record == {"equal": True, "version": 2}
