"""Shared fixtures: a tiny random Llama with a byte-level tokenizer and a ChatML template, built locally."""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
TESTS_DIR = REPO_ROOT / "tests"

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer():
    """A byte-level BPE tokenizer without merges: lossless on any text, ~260 tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(vocab_size: int, seed: int = 0):
    """A 2-layer random Llama small enough for CPU tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def save_wide_model(path) -> str:
    """Save a tiny random Llama whose linear layers, not its embeddings, hold most weights (as in real models), with
    head size 32 (which vLLM's CPU attention takes), and the tests' tokenizer, to ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=0, eos_token_id=2,
                         pad_token_id=0, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """Directory of a saved tiny random Llama + tokenizer, loadable with from_pretrained."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_tokenizer()
    model = build_tiny_model(len(tokenizer))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def load_bench_script(name: str):
    """Import ``bench/<name>.py`` (a script, not a package module) for its functions."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_thinking_tokenizer(chat_template: str | None = None):
    """``build_tokenizer()`` plus ``<think>``/``</think>`` special tokens and a Qwen3-style chat template.

    The default template ends the generation prompt with an empty think block when ``enable_thinking`` is
    false (``<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n``), else with ``<|im_start|>assistant\\n``.
    """
    tokenizer = build_tokenizer()
    tokenizer.add_tokens(["<think>", "</think>"], special_tokens=True)
    tokenizer.chat_template = chat_template or (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
        "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
        "{% endif %}"
    )
    return tokenizer


# ---- configs and CLI runs ------------------------------------------------------------------------------
def write_config(tmp_path, model_dir, objective="self_distillation", callbacks=(), lora=True, teacher="base",
                 rollouts_per_problem=1, extra_trainer=None, evaluation=None):
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 2,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "limit_val_batches": 0,
            "num_sanity_val_steps": 0,
            "default_root_dir": str(tmp_path),
            "callbacks": [{"class_path": c} if isinstance(c, str) else c for c in callbacks],
            **(extra_trainer or {}),
        },
        "model": {
            "class_path": "sdlit.module.SelfDistillationModule",
            "init_args": {
                "model": model_dir,
                "objective": objective,
                "teacher": teacher,
                "learning_rate": 0.01,
                "lora": {"r": 4, "alpha": 8} if lora else None,
            },
        },
        "data": {
            "class_path": "sdlit.data.RolloutDataModule",
            "init_args": {
                "task": {"class_path": "sdlit.tasks.arith.Arith", "init_args": {"train_size": 16, "eval_size": 4}},
                "batch_size": 2,
                "rollouts_per_problem": rollouts_per_problem,
                "sampling": {"max_new_tokens": 12},
                "evaluation": {"k": 3, "max_new_tokens": 8, "batch_size": 2, "num_problems": 2, **(evaluation or {})},
            },
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def offline_rows(groups_of: int = 1) -> list[dict]:
    """Offline data: 16 rollouts whose responses have very different lengths (1 to 6 steps), with contexts and
    rewards."""
    rows = []
    for i in range(16):
        steps = "\n".join(f"Step {s + 1}: {i} + {s} = {i + s}" for s in range(1 + (i * 5) % 6))
        rows.append({
            "question": f"What is {i} + {i % 3}?",
            "solution": f"{i}+{i % 3}=<<{i}+{i % 3}={i + i % 3}>>{i + i % 3}\n#### {i + i % 3}",
            "answer": str(i + i % 3),
            "response": f"{steps}\nAnswer: {i}",
            "context": f"The answer is {i + i % 3}." + " Check each step." * (i % 4),
            "reward": float((i * 7) % 3 == 0),
            "group": i // groups_of,
        })
    return rows


def print_config(args, capsys) -> dict:
    """The resolved config of ``sdlit fit ARGS --print_config``."""
    from sdlit.cli import run_cli

    with pytest.raises(SystemExit) as exit_info:
        run_cli(["fit", *args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def subprocess_env(*dirs: Path) -> dict:
    """The environment of a child ``sdlit`` process: this checkout's sdlit, the tests' helper modules
    (``feedback_examples``) and ``dirs`` (e.g. a test file's own folder, for classes named in its configs)."""
    paths = [REPO_ROOT, TESTS_DIR, *dirs]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in paths)}


# ---- several processes ------------------------------------------------------------------------------------
def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def gloo_group(rank: int, world_size: int, port: int):
    """A gloo process group over 127.0.0.1 for the body of the ``with`` (inside ``torch.multiprocessing.spawn``)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


# ---- rollouts ---------------------------------------------------------------------------------------------
def rollouts_with_context(tokenizer, count=2):
    """``count`` rollouts of one problem with rewards 0, 1, ... and a teacher context, tokenized once."""
    from sdlit.prompts import student_prompt_ids
    from sdlit.rollout import Rollout
    from sdlit.tasks.base import Problem

    problem = Problem("What is 2 + 3?", "2+3=<<2+3=5>>5\n#### 5", "5", "p0")
    out = []
    for i in range(count):
        response = f"Step 1: 2 + 3 = {5 + i}\nAnswer: {5 + i}"
        out.append(Rollout(problem=problem, prompt_ids=student_prompt_ids(tokenizer, problem.question),
                           response_ids=tokenizer(response, add_special_tokens=False)["input_ids"]
                           + [tokenizer.eos_token_id], response=response, group=0, reward=float(i),
                           context="The answer is 5."))
    return out


CRITIC_QUESTION = "Tom has 3 apples and buys 4 more. He doubles them. How many apples?"
CRITIC_SOLUTION = "3 + 4 = <<3+4=7>>7\n7 * 2 = <<7*2=14>>14\n#### 14"
CRITIC_RESPONSE = "Step 1: 3 + 4 = 7\nStep 2: 7 * 2 = 15\nAnswer: 15"


def critic_rollouts(n: int, response: str = CRITIC_RESPONSE) -> list:
    """``n`` rollouts of one two-step problem, each with ``response`` (default: step 2 wrong)."""
    from sdlit.rollout import Rollout
    from sdlit.tasks.base import Problem

    problem = Problem(id="p0", question=CRITIC_QUESTION, solution=CRITIC_SOLUTION, answer="14")
    return [Rollout(problem=problem, prompt_ids=[1], response_ids=[2], response=response) for _ in range(n)]


# ---- kernels ----------------------------------------------------------------------------------------------
def fused_grads(fn, hs, ht, w, upstream, **kw):
    """``fn(hs, ht, w, **kw)``'s value and the gradients of ``hs`` and ``w`` under ``upstream``; the teacher ``ht``
    must get none."""
    hs = hs.detach().clone().requires_grad_(True)
    ht = ht.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    loss = fn(hs, ht, w, **kw)
    (loss * upstream).sum().backward()
    assert ht.grad is None
    return loss.detach(), hs.grad, w.grad


def logits_then_divergence(hs, ht, w, mask=None, **kw):
    """The unfused reference: full logits ``h @ w.T``, then :func:`sdlit.kernels.per_token_divergence`."""
    from sdlit.kernels import per_token_divergence

    return per_token_divergence(hs @ w.T, ht @ w.T, mask, **kw)


def random_logits(*shape, dtype=torch.float32, seed=0, scale=3.0):
    """Seeded normal logits of ``shape``, times ``scale``, in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def value_and_grad(fn, student, teacher, upstream=None, **kw):
    """``fn(student, teacher, **kw)`` and the student's gradient under ``upstream`` (default ones)."""
    student = student.detach().clone().requires_grad_(True)
    loss = fn(student, teacher, **kw)
    up = torch.ones_like(loss) if upstream is None else upstream
    (loss * up).sum().backward()
    return loss.detach(), student.grad


def assert_close(a, b, rtol=1e-5, atol=1e-6):
    """``torch.testing.assert_close`` of the two in fp32."""
    torch.testing.assert_close(a.float(), b.float(), rtol=rtol, atol=atol)
