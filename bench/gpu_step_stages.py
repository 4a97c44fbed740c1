"""Stages 3 and 4 of ``bench/gpu_check.py``: the training step against TRL and rollout generation, both through
``bench/step.py``'s workers (and ``bench/trl_peer.py``) on the random-weight model; see ``gpu_stages.py`` for the
stage protocol.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:  # loaded by path: the bench scripts are imported from beside this file
    sys.path.insert(0, str(BENCH))
import step  # noqa: E402  (bench/step.py: the step and generation workers, their commands and tables)
from gpu_stages import fmt, step_sizes  # noqa: E402

# ---- 3. the training step against TRL ---------------------------------------------------------------------------
STEP_RUNS = (  # (condition, label, side, worker flags), in order of importance: a cut stage keeps the first ones
    ("reference", "sdlit", "sdlit", []),
    ("reference", "trl", "peer", []),
    ("grpo", "sdlit", "sdlit", []),
    ("grpo", "trl", "peer", []),
    ("reference", "sdlit, no fused output head", "sdlit", ["--fused-output-head", "off"]),
    ("grpo", "sdlit, no fused output head", "sdlit", ["--fused-output-head", "off"]),
)


def step_args(ctx, condition: str):
    """bench/step.py's options for one condition of stage 3."""
    sizes = step_sizes(ctx)
    return step.parse_args([
        "--conditions", condition, "--steps", str(sizes["steps"]), "--prompts", str(sizes[condition]),
        "--max-new-tokens", str(sizes["max_new_tokens"]), "--accelerator", sizes["accelerator"],
        "--model", str(ctx.model_dir()), "--lora-r", str(sizes["lora_r"]), "--lora-alpha", str(sizes["lora_alpha"]),
        "--generation-repeats", "0",
    ])


def training_step(ctx, stage: dict) -> None:
    """sdlit's Lightning step against TRL's SDFT and GRPO trainers doing the same work, fused output head on and off."""
    sizes = step_sizes(ctx)
    stage["details"]["sizes"] = sizes
    ctx.model_dir()
    stage["notes"].append(
        f"random-weight `{ctx.model_info['shape']}` ({ctx.model_info['parameters'] / 1e6:,.1f}M parameters), "
        f"LoRA r={sizes['lora_r']}, up to {sizes['max_new_tokens']} new tokens; reference: {sizes['reference']} "
        f"prompts x 1 rollout, grpo: {sizes['grpo']} prompts x 8 rollouts; {sizes['steps']} steps per run, "
        "s/step leaves out the first step when there are more")
    no_trl = importlib.util.find_spec("trl") is None
    if no_trl:
        stage["notes"].append("TRL rows skipped: trl is not installed here (`pip install -e '.[bench]'`; on the GPU "
                              "machine it comes from .gpu-wheels)")
    runs = stage["details"].setdefault("runs", {})
    for condition, label, side, flags in STEP_RUNS:
        if side == "peer" and no_trl:
            continue
        args = step_args(ctx, condition)
        command = step.worker_command(args, "sdlit", condition, *flags) if side == "sdlit" else \
            step.peer_command(args, condition)
        run = ctx.run(command, f"stage3_{condition}_{label.replace(', ', '_').replace(' ', '_')}")
        runs[f"{condition}/{label}"] = run.summary()
        ctx.write()
        if run.timed_out:
            stage["status"] = "timeout"
            break
    stage["figures"].update(step_figures(runs))
    stage["markdown"] = step_tables(runs, ctx.dry_run)
    failed = [k for k, r in runs.items() if not r.get("result")]
    stage["status"] = stage["status"] or ("ok" if not failed else "partial" if len(failed) < len(runs) else "failed")


def run_figures(result: dict) -> dict:
    """s/step, tokens/s and peak memory of one sdlit or TRL run."""
    seconds = step.seconds_per_step(result)
    if "steps" in result and isinstance(result["steps"], list):
        tokens = step.steady([s["generated_tokens"] for s in result["steps"]])
    else:
        tokens = step.steady(result.get("completion_tokens") or [0])
    figures = {"s_per_step": seconds, "tokens_per_s": tokens / seconds if seconds else 0.0}
    figures["peak_mib"] = result.get("peak_gpu_mib") or result.get("peak_rss_mib")
    return {k: v for k, v in figures.items() if v}


def step_figures(runs: dict) -> dict:
    figures = {}
    for key, run in runs.items():
        if run.get("result"):
            figures.update({f"{key}/{name}": value for name, value in run_figures(run["result"]).items()})
    for condition in ("reference", "grpo"):
        ours, theirs = runs.get(f"{condition}/sdlit", {}), runs.get(f"{condition}/trl", {})
        if ours.get("result") and theirs.get("result"):
            a, b = run_figures(ours["result"]), run_figures(theirs["result"])
            figures[f"{condition}/sdlit_vs_trl/time"] = a["s_per_step"] / b["s_per_step"]
            if a.get("peak_mib") and b.get("peak_mib"):
                figures[f"{condition}/sdlit_vs_trl/memory"] = a["peak_mib"] / b["peak_mib"]
    return figures


def step_tables(runs: dict, dry_run: bool) -> list[str]:
    memory = "peak RSS MiB" if dry_run else "peak GPU MiB"
    lines = [f"| condition | side | s/step | tokens/s | {memory} | result |", "|---|---|---|---|---|---|"]
    for key, run in runs.items():
        condition, label = key.split("/", 1)
        if not run.get("result"):
            lines.append(f"| {condition} | {label} | | | | {run.get('error') or 'no result'} |")
            continue
        f = run_figures(run["result"])
        name = run["result"].get("peer", label)
        lines.append(f"| {condition} | {name} | {f['s_per_step']:.2f} | {fmt(f.get('tokens_per_s'), '.0f')} | "
                     f"{fmt(f.get('peak_mib'), '.0f')} | ok |")
    for condition in ("reference", "grpo"):
        ours, theirs = runs.get(f"{condition}/sdlit", {}), runs.get(f"{condition}/trl", {})
        if ours.get("result") and theirs.get("result"):
            a, b = run_figures(ours["result"]), run_figures(theirs["result"])
            time_ratio = a["s_per_step"] / b["s_per_step"]
            mem_ratio = a["peak_mib"] / b["peak_mib"] if a.get("peak_mib") and b.get("peak_mib") else None
            goal = "" if dry_run else (" (goal <= 0.67x time at no more memory: "
                                       f"{'met' if time_ratio <= 0.67 and (mem_ratio or 0) <= 1.0 else 'missed'})")
            lines.append(f"\n{condition}: sdlit / TRL **{time_ratio:.2f}x** s/step, **{fmt(mem_ratio, '.2f', 'x')}** "
                         f"peak memory{goal}")
        if ours.get("result"):
            lines += ["", f"{condition}, sdlit phases:", ""] + step.phase_table(ours["result"])
    return lines


# ---- 4. rollout generation --------------------------------------------------------------------------------------
def generation(ctx, stage: dict) -> None:
    """sdlit's sampler against plain generate on the same rows, at two batch sizes."""
    rows, tokens = ((2, 4), 8) if ctx.dry_run else ((32, 256), 256)
    sizes = step_sizes(ctx)
    ctx.model_dir()
    stage["notes"].append(f"random-weight `{ctx.model_info['shape']}`, LoRA r={sizes['lora_r']}, up to {tokens} new "
                          "tokens per row (a random model rarely samples EOS), one timed call per sampler after a "
                          "warm-up (GPU)")
    stage["notes"].append(vllm_line())
    results = stage["details"].setdefault("rows", {})
    for count in rows:
        args = step.parse_args([
            "--prompts", str(count), "--max-new-tokens", str(tokens), "--accelerator", sizes["accelerator"],
            "--model", str(ctx.model_dir()), "--lora-r", str(sizes["lora_r"]), "--lora-alpha", str(sizes["lora_alpha"]),
            "--generation-repeats", "1", "--generation-samplers", "generate", "static_cache",
            *(["vllm"] if importlib.util.find_spec("vllm") is not None else [])])
        run = ctx.run(step.worker_command(args, "generation", "reference"), f"stage4_generation_{count}_rows")
        results[str(count)] = run.summary()
        ctx.write()
        if run.timed_out:
            stage["status"] = "timeout"
            break
    stage["figures"].update(generation_figures(results))
    stage["markdown"] = generation_table(results)
    failed = [k for k, r in results.items() if not r.get("result")]
    stage["status"] = stage["status"] or ("ok" if not failed else "partial" if len(failed) < len(results) else "failed")


def vllm_line() -> str:
    """What stage 4 says of vLLM: timed beside the other samplers where it is installed, else why it is absent."""
    if importlib.util.find_spec("vllm") is not None:
        return "vLLM engine rows: `data.sampler: vllm` timed beside the other samplers (vLLM is installed here)"
    return ("vLLM engine rows: absent: vLLM is not installed here (`pip install 'sdlit[vllm]'`; the lent GPU machines "
            "have none, and its wheel is larger than what can be carried)")


def generation_rates(result: dict) -> dict:
    """sampler -> generated tokens per second."""
    return {name: sum(r["tokens"] for r in runs) / sum(r["seconds"] for r in runs)
            for name, runs in result["runs"].items() if runs}


def generation_figures(results: dict) -> dict:
    figures = {}
    for count, run in results.items():
        if run.get("result"):
            rates = generation_rates(run["result"])
            figures.update({f"{count}_rows/{name}/tokens_per_s": rate for name, rate in rates.items()})
            if rates.get("generate") and rates.get("static_cache"):
                figures[f"{count}_rows/sdlit_vs_generate"] = rates["static_cache"] / rates["generate"]
    return figures


def generation_table(results: dict) -> list[str]:
    lines = ["| rows | plain generate tokens/s | sdlit sampler tokens/s | sdlit / generate |", "|---|---|---|---|"]
    for count, run in results.items():
        if not run.get("result"):
            lines.append(f"| {count} | {run.get('error') or 'no result'} | | |")
            continue
        rates = generation_rates(run["result"])
        gen, ours = rates.get("generate"), rates.get("static_cache")
        lines.append(f"| {count} | {fmt(gen, '.0f')} | {fmt(ours, '.0f')} | "
                     f"**{fmt(ours / gen if gen and ours else None, '.2f', 'x')}** |")
    return lines
