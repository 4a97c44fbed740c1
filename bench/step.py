"""Training-step throughput, phase by phase, against TRL doing the same work, in one run.

Per condition (``reference``: self-distillation, the teacher sees the reference solution, 1 rollout per prompt;
``grpo``: binary reward, 8 rollouts per prompt), each in a fresh process so that peak RSS is its own:

1. sdlit: ``--steps`` optimizer steps of a real Lightning ``Trainer`` run on the packaged SmolLM2-135M-Instruct
   with LoRA (r=16, alpha=32), ``--prompts`` GSM8K problems per step, ``--max-new-tokens`` new tokens;
   per phase (rollout, feedback, teacher, student forward, student backward, optimizer and the rest) the seconds,
   tokens/s and share of the step, from the module's own phase timer and Lightning's backward hooks;
2. the peer, right after (so that both see the same machine load): the same work with TRL
   (``bench/trl_peer.py``; needs ``pip install -e '.[bench]'``); with ``--rounds N`` the pair runs N times and each
   side's table row is its fastest round, every round printed beside it;
3. ablations (``--ablations``): sdlit again with one speed-up off (length-grouped scoring, the sampler, the fused
   output head, the lean Llama decode step, huge pages), so each speed-up shows its effect on the whole step, or
   with one variant on (``nf4``: the QLoRA solver, for its step time and memory against the unquantised one;
   ``vllm``: rollouts by the vLLM engine, run from the environment of ``make setup-vllm``);
4. rollout generation alone: sdlit's sampler (``data.sampler: static_cache``) against plain ``model.generate`` on
   the same batch, alternating, tokens/s (real tokens, up to each row's EOS).

Every figure is printed as measured, with the ratio sdlit / peer; step times are the mean over the steps after the
first (the first includes one-time warm-up) when there are more than one. CPU: fp32. On a GPU
(``--accelerator gpu``) sdlit uses bf16-mixed and the sizes given (e.g. ``--prompts 32``), and every worker also
reports its peak GPU memory (``torch.cuda.max_memory_allocated``). ``--model DIR`` runs both sides on another model
(e.g. the random-weight Qwen3-1.7B of ``bench/gpu_model.py``; default: the packaged SmolLM2), ``--lora-r`` /
``--lora-alpha`` set the adapter of both sides.

    python bench/step.py                                  # both conditions, 3 steps each, TRL beside
    python bench/step.py --conditions reference --steps 2 --peer none
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback

import sdlit  # noqa: F401  (before torch: sdlit puts large CPU tensors on huge pages, see sdlit/__init__.py)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = "smollm2-135m-instruct"  # sdlit.models.SMOLLM2_ALIAS: the packaged SmolLM2-135M-Instruct
GENERATION_SAMPLERS = ("generate", "static_cache", "static_cache_model_forward", "static_cache_plain_linears")
# data.sampler: vllm, where vLLM is installed (make setup-vllm): --generation-samplers ... vllm
OPTIONAL_SAMPLERS = ("vllm",)
ROLLOUTS = {"reference": 1, "grpo": 8}
ABLATIONS = {  # speed-up -> (worker flags that turn it off, label)
    "length_groups": (["--length-groups", "off"], "one padded pass (no length groups)"),
    "sampler": (["--sampler", "generate"], "plain generate (no static-cache sampler)"),
    "fused_head": (["--fused-output-head", "off"], "logits path (no fused output head)"),
    "logits_head": (["--fused-output-head", "on"], "fused output head forced on"),
    "huge_pages": (["--huge-pages", "off"], "glibc heap for large tensors (THP_MEM_ALLOC_ENABLE=0)"),
    "llama_decoding": (["--llama-decoding", "off"], "decode steps by the model's forward (no lean Llama step)"),
    "nf4": (["--quantization", "nf4"], "QLoRA: nf4 base through bitsandbytes (model.quantization: nf4)"),
    "vllm": (["--sampler", "vllm"], "rollouts by the vLLM engine (data.sampler: vllm; needs vLLM installed)"),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--conditions", nargs="+", default=["reference", "grpo"], choices=list(ROLLOUTS))
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per run")
    p.add_argument("--rounds", type=int, default=1,
                   help="sdlit and the peer this many times each, alternating; each side's table row is its fastest "
                        "round (a shared machine only ever slows a run down), every round's figures are printed")
    p.add_argument("--prompts", type=int, default=8, help="problems per optimizer step")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--peer", choices=["trl", "none"], default="trl")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="model of both sides: packaged alias or a local model directory with its tokenizer")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank of both sides")
    p.add_argument("--lora-alpha", type=int, default=32, help="LoRA alpha of both sides")
    p.add_argument("--generation-repeats", type=int, default=2, help="timed sampler/generate pairs (0: skip)")
    p.add_argument("--generation-samplers", nargs="+", default=list(GENERATION_SAMPLERS),
                   choices=GENERATION_SAMPLERS + OPTIONAL_SAMPLERS,
                   help="what the generation timing runs: plain generate, sdlit's sampler, the sampler with decode "
                        "steps through the model's forward, the sampler on the model's own (unmerged) linears")
    p.add_argument("--accelerator", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--ablations", nargs="*", default=["length_groups"], choices=list(ABLATIONS),
                   help="also run sdlit with one setting changed: length_groups off, sampler: plain generate, "
                        "fused_head: losses from logits, logits_head: fused output head forced on, "
                        "huge_pages: large CPU tensors on the glibc heap instead of transparent huge pages, "
                        "llama_decoding: the sampler's decode steps through the model's own forward, "
                        "nf4: the solver's linears in 4 bits (QLoRA; needs the quantization extra), "
                        "vllm: rollouts by the vLLM engine (run from .venv-vllm)")
    p.add_argument("--json", default=None, help="also write every result to this file")
    p.add_argument("--sampler", choices=["static_cache", "generate", "vllm"], default="static_cache",
                   help=argparse.SUPPRESS)
    p.add_argument("--length-groups", choices=["on", "off"], default="on", help=argparse.SUPPRESS)
    p.add_argument("--fused-output-head", choices=["auto", "on", "off"], default="auto", help=argparse.SUPPRESS)
    p.add_argument("--huge-pages", choices=["on", "off"], default="on", help=argparse.SUPPRESS)
    p.add_argument("--llama-decoding", choices=["on", "off"], default="on", help=argparse.SUPPRESS)
    p.add_argument("--quantization", choices=["none", "nf4", "fp4", "int8"], default="none", help=argparse.SUPPRESS)
    p.add_argument("--worker", choices=["sdlit", "generation"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--condition", choices=list(ROLLOUTS), default="reference", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---- workers (each in its own process) -----------------------------------------------------------------------
def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_gpu_mib(accelerator: str) -> float | None:
    """Peak GPU memory this process allocated through torch, in MiB (None off the GPU)."""
    import torch

    if accelerator != "gpu" or not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated() / 2**20


def huge_pages_in_use() -> bool:
    """Whether this process has memory on transparent huge pages (Linux; False elsewhere)."""
    try:
        rollup = Path("/proc/self/smaps_rollup").read_text()
    except OSError:
        return False
    return any(line.startswith("AnonHugePages:") and int(line.split()[1]) > 0 for line in rollup.splitlines())


def sdlit_worker(args) -> dict:
    """``args.steps`` optimizer steps of ``sdlit`` on the condition; per-step phase seconds and token counts."""
    import lightning as L

    from sdlit.callbacks import BinaryReward, ReferenceSolution
    from sdlit.data import RolloutDataModule
    from sdlit.models import LoraSettings
    from sdlit.module import SelfDistillationModule
    from sdlit.settings import SamplingSettings
    from sdlit.tasks.gsm8k import GSM8K

    L.seed_everything(0, verbose=False)
    grpo = args.condition == "grpo"
    module = SelfDistillationModule(
        model=args.model, lora=LoraSettings(r=args.lora_r, alpha=args.lora_alpha), teacher="base",
        objective="grpo" if grpo else "self_distillation",
        divergence="forward_kl", learning_rate=args.lr, gradient_checkpointing=grpo,
        length_groups=args.length_groups == "on",
        fused_output_head={"auto": None, "on": True, "off": False}[args.fused_output_head],
        quantization=None if args.quantization == "none" else args.quantization,
    )
    data = RolloutDataModule(
        task=GSM8K(train_size=args.prompts * args.steps), batch_size=args.prompts,
        rollouts_per_problem=ROLLOUTS[args.condition], shuffle=False, sampler=args.sampler,
        sampling=SamplingSettings(temperature=args.temperature, max_new_tokens=args.max_new_tokens),
        llama_step=args.llama_decoding == "on",
    )
    recorder = StepRecorder()
    feedback = [BinaryReward()] + ([] if grpo else [ReferenceSolution()])
    trainer = L.Trainer(
        accelerator=args.accelerator, devices=1, max_steps=args.steps, callbacks=[*feedback, recorder],
        precision="bf16-mixed" if args.accelerator == "gpu" else "32-true", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=data)
    return {"side": "sdlit", "condition": args.condition, "steps": recorder.steps, "peak_rss_mib": peak_rss_mib(),
            "peak_gpu_mib": peak_gpu_mib(args.accelerator), "model": args.model,
            "sampler": args.sampler, "length_groups": args.length_groups,
            "fused_output_head": args.fused_output_head, "huge_pages": huge_pages_in_use(),
            "llama_decoding": args.llama_decoding, "quantization": args.quantization}


class StepRecorder(Callback):
    """Wall time of every optimizer step, split into the module's phases plus the student's backward."""

    def __init__(self):
        self.steps: list[dict] = []
        self._start = self._backward = 0.0

    def on_train_epoch_start(self, trainer, module):
        self._start = time.perf_counter()

    def on_before_backward(self, trainer, module, loss):
        self._backward = time.perf_counter()

    def on_after_backward(self, trainer, module):
        self._backward = time.perf_counter() - self._backward

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        now = time.perf_counter()
        phases = dict(module.phase_timer.last, backward=self._backward)
        phases["optimizer and rest"] = now - self._start - sum(phases.values())
        self.steps.append({"seconds": now - self._start, "phases": phases, "rollouts": len(batch),
                           "generated_tokens": sum(len(r.response_ids) for r in batch)})
        self._start = now


def generation_worker(args) -> dict:
    """sdlit's sampler and plain ``generate`` on the same batch, alternating; seconds and real tokens of each."""
    import torch

    from sdlit.models import LoraSettings, add_lora, load_model, load_tokenizer
    from sdlit.prompts import student_prompt_ids
    from sdlit.sampling import eos_ids, sample_responses, sample_with_static_cache
    from sdlit.settings import SamplingSettings
    from sdlit.tasks.gsm8k import GSM8K

    tokenizer = load_tokenizer(args.model)
    dtype = "bfloat16" if args.accelerator == "gpu" else None
    model = add_lora(load_model(args.model, dtype), LoraSettings(r=args.lora_r, alpha=args.lora_alpha)).eval()
    if args.accelerator == "gpu":
        model = model.cuda()
    problems = GSM8K(train_size=args.prompts).train_problems()
    prompts = [student_prompt_ids(tokenizer, p.question) for p in problems]
    n = ROLLOUTS[args.condition]
    runs = {sampler: [] for sampler in args.generation_samplers}
    engine = None
    if "vllm" in runs:  # started and synced with the LoRA model before timing, as a training run does at set-up
        from sdlit.models import resolve_model_path
        from sdlit.sampling.vllm_engine import engine_for
        from sdlit.settings import VLLMSettings

        engine = engine_for(resolve_model_path(args.model), args.lora_r, VLLMSettings(), dtype)
        engine.sync(model, 0)

    def generate(sampler: str, max_new_tokens: int) -> list[list[int]]:
        if sampler == "static_cache_plain_linears":  # the sampler with the model's own (LoRA, unpacked) linears
            return sample_with_static_cache(model, prompts, eos_ids(model, tokenizer), tokenizer.pad_token_id,
                                            n=n, temperature=args.temperature, max_new_tokens=max_new_tokens,
                                            fast_linears=False)
        settings = SamplingSettings(temperature=args.temperature, max_new_tokens=max_new_tokens)
        return sample_responses(model, tokenizer, prompts, n=n, settings=settings, engine=engine,
                                llama_step=sampler == "static_cache", sampler=sampler.removesuffix("_model_forward"))

    if args.accelerator == "gpu":  # CUDA context, kernels and allocator warm-up, not timed
        for sampler in runs:
            generate(sampler, 4)
    for repeat in range(args.generation_repeats):
        for sampler in runs:
            torch.manual_seed(repeat)
            start = time.perf_counter()
            out = generate(sampler, args.max_new_tokens)
            if args.accelerator == "gpu":
                torch.cuda.synchronize()
            runs[sampler].append({"seconds": time.perf_counter() - start, "tokens": sum(len(r) for r in out)})
    return {"side": "generation", "condition": args.condition, "rows": len(prompts) * n, "runs": runs,
            "max_new_tokens": args.max_new_tokens, "peak_gpu_mib": peak_gpu_mib(args.accelerator)}


# ---- the orchestrator ----------------------------------------------------------------------------------------
def run_process(command: list[str]) -> dict:
    """Run a worker process and return the JSON of its ``RESULT`` line (its log goes to stderr)."""
    env = dict(os.environ, TRL_EXPERIMENTAL_SILENCE="1", TOKENIZERS_PARALLELISM="false")
    if "--huge-pages" in command:  # torch reads it at its first allocation: it must be in the worker's environment
        env["THP_MEM_ALLOC_ENABLE"] = "1" if command[command.index("--huge-pages") + 1] == "on" else "0"
    proc = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=sys.stderr, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{' '.join(command)} failed (exit {proc.returncode})")
    return json.loads(lines[-1].removeprefix("RESULT "))


def worker_command(args, worker: str, condition: str, *extra: str) -> list[str]:
    return [sys.executable, __file__, "--worker", worker, "--condition", condition, "--steps", str(args.steps),
            "--prompts", str(args.prompts), "--max-new-tokens", str(args.max_new_tokens), "--temperature",
            str(args.temperature), "--lr", str(args.lr), "--accelerator", args.accelerator,
            "--generation-repeats", str(args.generation_repeats), "--model", args.model, "--lora-r", str(args.lora_r),
            "--lora-alpha", str(args.lora_alpha), "--generation-samplers", *args.generation_samplers] + list(extra)


def peer_command(args, condition: str) -> list[str]:
    return [sys.executable, str(ROOT / "bench" / "trl_peer.py"), "--condition", condition, "--steps",
            str(args.steps), "--prompts", str(args.prompts), "--max-new-tokens", str(args.max_new_tokens),
            "--temperature", str(args.temperature), "--lr", str(args.lr), "--accelerator", args.accelerator,
            "--model", args.model, "--lora-r", str(args.lora_r), "--lora-alpha", str(args.lora_alpha)]


def steady(values: list[float]) -> float:
    """Mean over the steps after the first (one-time warm-up), or the only one."""
    rest = values[1:] or values
    return sum(rest) / len(rest)


def seconds_per_step(result: dict) -> float:
    """Steady seconds per optimizer step of one sdlit or peer run."""
    if "seconds_per_step" in result:  # the peer
        return steady(result["seconds_per_step"])
    return steady([s["seconds"] for s in result["steps"]])


def pick_fastest_rounds(results: dict, condition: str) -> None:
    """Set ``{condition}/sdlit`` and ``{condition}/peer`` to each side's fastest round."""
    for side in ("sdlit", "peer"):
        rounds = [v for k, v in results.items() if k.startswith(f"{condition}/{side}/round")]
        if rounds:
            results[f"{condition}/{side}"] = min(rounds, key=seconds_per_step)


def rounds_line(results: dict, condition: str) -> str | None:
    """Every round's s/step of both sides and their ratio, when there was more than one round."""
    pairs, index = [], 0
    while f"{condition}/sdlit/round{index}" in results:
        ours = seconds_per_step(results[f"{condition}/sdlit/round{index}"])
        peer = results.get(f"{condition}/peer/round{index}")
        pairs.append(f"round {index + 1}: {ours:.2f}" + (
            f" / {seconds_per_step(peer):.2f} ({ours / seconds_per_step(peer):.2f}x)" if peer else ""))
        index += 1
    if index < 2:
        return None
    return "s/step by round (sdlit / peer): " + "; ".join(pairs) + ". Table rows: each side's fastest round."


def phase_table(result: dict) -> list[str]:
    steps = result["steps"][1:] or result["steps"]
    total = sum(s["seconds"] for s in steps) / len(steps)
    generated = sum(s["generated_tokens"] for s in steps) / len(steps)
    lines = ["| phase | seconds | tokens/s | share of step |", "|---|---|---|---|"]
    for name in steps[0]["phases"]:
        seconds = sum(s["phases"][name] for s in steps) / len(steps)
        rate = f"{generated / seconds:.0f}" if name != "optimizer and rest" and seconds > 0 else ""
        lines.append(f"| {name} | {seconds:.2f} | {rate} | {seconds / total:.0%} |")
    lines.append(f"| **step** | **{total:.2f}** | {generated / total:.0f} | 100% |")
    return lines


def report(args, results: dict) -> None:
    print(f"\n## Machine: {machine(args.accelerator)}; {args.prompts} prompts x n rollouts, {args.max_new_tokens} "
          f"new tokens, temperature {args.temperature}, LoRA r={args.lora_r}; step figures: mean of steps "
          f"2..{args.steps}"
          if args.steps > 1 else "")
    for condition in args.conditions:
        ours, peer, gen = (results.get(f"{condition}/{k}") for k in ("sdlit", "peer", "generation"))
        print(f"\n### {condition} (n={ROLLOUTS[condition]}): sdlit phases (tokens/s = generated tokens / phase s)\n")
        print("\n".join(phase_table(ours)))
        print("\n| side | s/step | peak RSS MiB |\n|---|---|---|")
        mine = seconds_per_step(ours)
        print(f"| sdlit | {mine:.2f} | {ours['peak_rss_mib']:.0f} |")
        for name, (_, label) in ABLATIONS.items():
            off = results.get(f"{condition}/sdlit-no-{name}")
            if off:
                print(f"| sdlit, {label} | {steady([s['seconds'] for s in off['steps']]):.2f} | "
                      f"{off['peak_rss_mib']:.0f} |")
        if peer:
            theirs = seconds_per_step(peer)
            print(f"| {peer['peer']} | {theirs:.2f} | {peer['peak_rss_mib']:.0f} |")
            print(f"| **sdlit / peer** | **{mine / theirs:.2f}x** | "
                  f"**{ours['peak_rss_mib'] / peer['peak_rss_mib']:.2f}x** |")
        if rounds_line(results, condition):
            print(f"\n{rounds_line(results, condition)}")
        if gen and {"generate", "static_cache"} <= set(gen["runs"]):  # (--generation-samplers may leave one out)
            rates = {k: sum(r["tokens"] for r in v) / sum(r["seconds"] for r in v) for k, v in gen["runs"].items()}
            print(f"\nrollout generation, {gen['rows']} rows: plain generate {rates['generate']:.1f} tokens/s, "
                  f"sdlit sampler {rates['static_cache']:.1f} tokens/s: "
                  f"**{rates['static_cache'] / rates['generate']:.2f}x**")
            if "static_cache_model_forward" in rates:
                forward = rates["static_cache_model_forward"]
                print(f"(sdlit sampler with decode steps through the model's forward, not the lean Llama step: "
                      f"{forward:.1f} tokens/s, {forward / rates['generate']:.2f}x)")
            if "vllm" in rates:
                print(f"(vLLM engine, data.sampler vllm: {rates['vllm']:.1f} tokens/s, "
                      f"{rates['vllm'] / rates['generate']:.2f}x generate, "
                      f"{rates['vllm'] / rates['static_cache']:.2f}x sdlit's sampler)")
            if "static_cache_plain_linears" in rates:
                plain = rates["static_cache_plain_linears"]
                print(f"(sdlit sampler on the model's own LoRA linears, not merged and packed: {plain:.1f} tokens/s, "
                      f"{plain / rates['generate']:.2f}x)")


def machine(accelerator: str) -> str:
    import platform

    import torch

    if accelerator == "gpu" and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return (f"{os.cpu_count()}-core {platform.machine()} CPU, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads)")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        result = sdlit_worker(args) if args.worker == "sdlit" else generation_worker(args)
        print("RESULT " + json.dumps(result), flush=True)
        return
    results = {}
    for condition in args.conditions:
        started = time.perf_counter()
        for round_index in range(args.rounds):  # each pair back to back: the compared pair sees the same load
            results[f"{condition}/sdlit/round{round_index}"] = run_process(worker_command(args, "sdlit", condition))
            if args.peer == "trl":
                results[f"{condition}/peer/round{round_index}"] = run_process(peer_command(args, condition))
        pick_fastest_rounds(results, condition)
        for name in args.ablations:
            flags = ABLATIONS[name][0]
            results[f"{condition}/sdlit-no-{name}"] = run_process(worker_command(args, "sdlit", condition, *flags))
        if args.generation_repeats:
            results[f"{condition}/generation"] = run_process(worker_command(args, "generation", condition))
        print(f"{condition}: {time.perf_counter() - started:.0f} s of benchmark", file=sys.stderr, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1) + "\n")
    report(args, results)


if __name__ == "__main__":
    main()
