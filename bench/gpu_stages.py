"""Stages 1, 2 and 5 of ``bench/gpu_check.py`` (3 and 4: ``gpu_step_stages.py``), each run as subprocesses.

A stage function takes the check (``ctx``: options, output folders, the subprocess runner, the shared random-weight
model) and its ``stage`` dict, and fills the dict in place: ``status`` (ok, partial, failed, skipped, timeout),
``figures`` (name -> measured positive number), ``notes`` (lines for the report: what was skipped and why),
``details`` (everything else) and ``markdown`` (the report's tables). It calls ``ctx.write()`` after each
subprocess, so a stage cut short by its cap still leaves what it measured.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent

CUDA_TESTS = "tests/kernels/test_kernels_cuda.py"
TRITON_TESTS = "tests/kernels/test_kernels_triton.py"
# (teacher, LoRA) of the FSDP2 stage: the LoRA base teacher disables the adapter, the others swap weights (or not)
TEACHER_SETUPS = (("base", True), ("base", False), ("current", True), ("ema", False))


# ---- 1. the CUDA kernel tests -----------------------------------------------------------------------------------
def kernel_tests(ctx, stage: dict) -> None:
    """pytest of the compiled kernels on the GPU, then of the Triton tests; pass/fail counts per file."""
    files = [CUDA_TESTS, TRITON_TESTS]
    if ctx.dry_run:
        files = [CUDA_TESTS]
        stage["notes"].append(f"dry run: no CUDA device, so `{CUDA_TESTS}` skips itself; `{TRITON_TESTS}` (Triton's "
                              "CPU interpreter) is left to the CPU test suite")
    counts = stage["details"].setdefault("counts", {})
    for path in files:
        junit = ctx.logs / f"stage1_{Path(path).stem}.xml"
        run = ctx.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", path],
                      f"stage1_{Path(path).stem}")
        counts[path] = junit_counts(junit) if junit.exists() else {}
        counts[path]["exit_code"] = run.rc
        stage["figures"][f"{Path(path).stem}/seconds"] = run.seconds
        if run.timed_out:
            stage["status"] = "timeout"
            counts[path]["error"] = f"cut at the stage's time cap after {run.seconds:.0f} s"
            break
        if run.rc not in (0, 5) and not counts[path].get("tests"):
            counts[path]["error"] = run.error()
        ctx.write()
    stage["status"] = stage["status"] or tests_status(counts)
    stage["markdown"] = tests_table(counts)


def junit_counts(path: Path) -> dict:
    """tests / passed / failed / errors / skipped of a pytest JUnit XML file, and the failing tests' first lines."""
    cases = ElementTree.parse(path).getroot().iter("testcase")
    counts = {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": []}
    for case in cases:
        counts["tests"] += 1
        outcome = {child.tag for child in case} & {"failure", "error", "skipped"}
        key = {"failure": "failed", "error": "errors", "skipped": "skipped"}.get(next(iter(outcome), ""), "passed")
        counts[key] += 1
        for child in case:
            if child.tag in ("failure", "error"):
                message = (child.get("message") or "").splitlines()[0][:300] if child.get("message") else ""
                counts["failures"].append(f"{case.get('classname')}::{case.get('name')}: {message}")
    return counts


def tests_status(counts: dict) -> str:
    """ok when something passed and nothing failed; failed on any failure or error; skipped when all skipped."""
    per_file = list(counts.values())
    if any(c.get("failed") or c.get("errors") or c.get("error") for c in per_file):
        return "failed"
    if not any(c.get("passed") for c in per_file):
        return "skipped"
    return "ok"


def tests_table(counts: dict) -> list[str]:
    lines = ["| file | tests | passed | failed | errors | skipped |", "|---|---|---|---|---|---|"]
    for path, c in counts.items():
        lines.append(f"| `{path}` | {c.get('tests', '')} | {c.get('passed', '')} | {c.get('failed', '')} | "
                     f"{c.get('errors', '')} | {c.get('skipped', '')} |")
    for path, c in counts.items():
        lines += [f"- `{path}`: {failure}" for failure in c.get("failures", [])]
        if c.get("error"):
            lines.append(f"- `{path}`: {c['error']}")
    return lines


# ---- 2. the divergence kernels ----------------------------------------------------------------------------------
def divergence(ctx, stage: dict) -> None:
    """bench/gpu_divergence.py: sdlit's kernels against naive PyTorch and Liger-Kernel, same inputs."""
    out = ctx.logs / "stage2_divergence.json"
    sizes = ["--device", "cpu", "--n", "64", "--v", "1000", "--h", "32", "--dtype", "float32", "--repeats", "2"]
    command = [sys.executable, str(BENCH / "gpu_divergence.py"), "--json", str(out)]
    run = ctx.run(command + (sizes if ctx.dry_run else []), "stage2_divergence")
    report = json.loads(out.read_text()) if out.exists() else {"rows": []}
    stage["details"]["divergence"] = report
    if report.get("liger_skipped"):
        stage["notes"].append(f"Liger-Kernel rows skipped: {report['liger_skipped']}")
    if report.get("device") == "cpu":
        stage["notes"].append("peak memory is measured on CUDA only (torch.cuda.max_memory_allocated)")
    stage["figures"].update(divergence_figures(report))
    stage["markdown"] = divergence_tables(report) + ([] if ctx.dry_run else divergence_goals(report))
    errors = [r for r in report["rows"] if "error" in r]
    if run.timed_out:
        stage["status"] = "timeout"
    elif run.rc != 0 or not report["rows"]:
        stage["status"], stage["error"] = "failed", run.error()
    else:
        stage["status"] = "partial" if errors else "ok"


def rows_by(report: dict) -> dict:
    """(kind, input, variant) -> row."""
    return {(r["kind"], r["input"], r["variant"]): r for r in report.get("rows", [])}


def divergence_figures(report: dict) -> dict:
    figures = {}
    if report.get("copy"):
        figures["copy/gb_per_s"] = report["copy"]["gb_per_s"]
    for (kind, source, variant), row in rows_by(report).items():
        for key in ("ms", "peak_extra_mib", "gb_per_s", "share_of_copy"):
            if row.get(key):
                figures[f"{kind}/{source}/{variant}/{key}"] = row[key]
    return figures


def divergence_tables(report: dict) -> list[str]:
    rows = rows_by(report)
    copy = report.get("copy")
    head = (f"N={report.get('n')} V={report.get('v')} H={report.get('h')} {report.get('dtype')} on "
            f"{report.get('device')}, sdlit backend {report.get('backend')}; median of {report.get('repeats')} "
            "forward+backward calls after a warm-up")
    if copy:
        head += f"; device copy: {number(copy['gb_per_s'])} GB/s ({number(copy['bytes_moved'] / 1e9)} GB moved)"
    lines = [head, "", "| kind | from | variant | ms | peak extra MiB | GB/s | share of copy | time / naive | "
             "loss/token |", "|---|---|---|---|---|---|---|---|---|"]
    for (kind, source, variant), row in rows.items():
        if "ms" not in row:
            lines.append(f"| {kind} | {source} | {variant} | {row.get('skipped') or row.get('error')} | | | | | |")
            continue
        naive = rows.get((kind, source, "naive"), {}).get("ms")
        lines.append(f"| {kind} | {source} | {variant} | {row['ms']:.2f} | {fmt(row.get('peak_extra_mib'), '.0f')} | "
                     f"{number(row.get('gb_per_s'))} | {fmt(row.get('share_of_copy'), '.0%')} | "
                     f"{fmt(row['ms'] / naive if naive else None, '.2f', 'x')} | {row['loss_per_token']:.4f} |")
    return lines


def divergence_goals(report: dict) -> list[str]:
    """The issue's goals on the GPU, each met or missed as measured."""
    rows, lines = rows_by(report), ["", "Goals:"]
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        ours = rows.get((kind, "logits", "sdlit"), {})
        if "share_of_copy" in ours:
            lines.append(f"- {kind}: per_token_divergence at {ours['share_of_copy']:.0%} of the copy bandwidth "
                         f"(goal >= 70%): {'met' if ours['share_of_copy'] >= 0.70 else 'missed'}")
        for liger in ("liger_jsd", "liger_kl_div"):
            theirs = rows.get((kind, "logits", liger), {})
            if "ms" in ours and "ms" in theirs:
                lines.append(f"- {kind}: per_token_divergence {ours['ms']:.2f} ms against {liger} {theirs['ms']:.2f} "
                             f"ms (goal: faster): {'met' if ours['ms'] < theirs['ms'] else 'missed'}")
        fused, liger = rows.get((kind, "hidden", "sdlit"), {}), rows.get((kind, "hidden", "liger_fused_linear_jsd"), {})
        if "ms" in fused and "ms" in liger:
            met = fused["ms"] <= liger["ms"] and fused.get("peak_extra_mib", 0) <= liger.get("peak_extra_mib", 0)
            lines.append(f"- {kind}: fused_linear_divergence {fused['ms']:.2f} ms, "
                         f"{fmt(fused.get('peak_extra_mib'), '.0f')} MiB against Liger's fused linear JSD "
                         f"{liger['ms']:.2f} ms, {fmt(liger.get('peak_extra_mib'), '.0f')} MiB (goal: no slower, no "
                         f"more memory): {'met' if met else 'missed'}")
    return lines if len(lines) > 2 else []


def fmt(value, spec: str, suffix: str = "") -> str:
    """``value`` formatted, with ``suffix``; empty for None."""
    return "" if value is None else format(value, spec) + suffix


def number(value) -> str:
    """A measured rate or size: whole above 100, else three significant digits; empty for None."""
    if value is None:
        return ""
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


# ---- sizes shared by stages 3 to 5 -----------------------------------------------------------------------------
def step_sizes(ctx) -> dict:
    """Sizes of stage 3: the issue's on the GPU (32 rollouts of up to 512 tokens, LoRA r=64), tiny in a dry run."""
    if ctx.dry_run:
        return {"reference": 2, "grpo": 1, "max_new_tokens": 8, "steps": 1, "lora_r": 8, "lora_alpha": 16,
                "accelerator": "cpu"}
    return {"reference": 32, "grpo": 4, "max_new_tokens": 512, "steps": 2, "lora_r": 64, "lora_alpha": 128,
            "accelerator": "gpu"}



# ---- 5. FSDP2 on one GPU ----------------------------------------------------------------------------------------
def fsdp(ctx, stage: dict) -> None:
    """One ``sdlit fit`` step with ``--trainer.strategy fsdp2`` (sdlit's FSDP2 sharding) per teacher setup, through
    the real command line; the dry run takes the same path on one CPU process (gloo)."""
    results = stage["details"].setdefault("modes", {})
    for mode, lora in TEACHER_SETUPS:
        name = f"{mode}{'' if lora else ' (full)'}"
        config = write_fit_config(ctx, mode, lora)
        command = sdlit_command() + ["fit", "--config", str(config), "--trainer.strategy", "fsdp2"]
        run = ctx.run(command, f"stage5_fsdp2_{mode}_{'lora' if lora else 'full'}")
        results[name] = {"ok": run.rc == 0, **run.summary(expects_result=False), "command": " ".join(command)}
        if run.rc == 0:
            stage["figures"][f"{name}/seconds"] = run.seconds
        ctx.write()
        if run.timed_out:
            stage["status"] = "timeout"
            break
    lines = ["| teacher | `--trainer.strategy fsdp2` | seconds | error |", "|---|---|---|---|"]
    lines += [f"| {mode} | {'ok' if r['ok'] else 'failed'} | {r['seconds']:.0f} | {r.get('error') or ''} |"
              for mode, r in results.items()]
    stage["markdown"] = lines
    failed = [m for m, r in results.items() if not r["ok"]]
    stage["status"] = stage["status"] or ("ok" if not failed else "partial" if len(failed) < len(results) else "failed")


def sdlit_command() -> list[str]:
    """The ``sdlit`` script beside this Python, else ``python -m sdlit.cli`` (the same ``main``)."""
    script = Path(sys.executable).parent / "sdlit"
    return [str(script)] if script.exists() else [sys.executable, "-m", "sdlit.cli"]


def write_fit_config(ctx, mode: str, lora: bool = True) -> Path:
    """A one-step ``sdlit fit`` config on the random-weight model: reference-solution self-distillation, few tokens;
    LoRA, or full fine-tuning."""
    import yaml

    gpu = not ctx.dry_run
    sizes = step_sizes(ctx)
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "gpu" if gpu else "cpu", "devices": 1, "precision": "bf16-mixed" if gpu else
                    "32-true", "max_steps": 1, "logger": False, "enable_checkpointing": False,
                    "enable_progress_bar": False, "enable_model_summary": False, "limit_val_batches": 0,
                    "num_sanity_val_steps": 0, "default_root_dir": str(ctx.tmp / f"fit_{mode}_{lora}"),
                    "callbacks": [{"class_path": "sdlit.callbacks.BinaryReward"},
                                  {"class_path": "sdlit.callbacks.ReferenceSolution"}]},
        "model": {"class_path": "sdlit.module.SelfDistillationModule",
                  "init_args": {"model": str(ctx.model_dir()), "teacher": mode, "learning_rate": 1e-5,
                                "lora": {"r": sizes["lora_r"], "alpha": sizes["lora_alpha"]} if lora else None}},
        "data": {"class_path": "sdlit.data.RolloutDataModule",
                 "init_args": {"task": {"class_path": "sdlit.tasks.arith.Arith",
                                        "init_args": {"train_size": 4, "eval_size": 2}},
                               "batch_size": 2, "rollouts_per_problem": 1, "sampling": {"max_new_tokens": 8}}},
    }
    path = ctx.tmp / f"fit_{mode}_{lora}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path
