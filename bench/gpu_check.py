"""GPU readiness check: one command that measures sdlit on a GPU and writes gpu_check.md and gpu_check.json.

Made for a GPU machine lent for a few minutes, without network: it installs nothing (docs/gpu.md has the one-line
command that installs the carried wheels first) and builds a random-weight model of Qwen3-1.7B's shapes with a local
tokenizer (``bench/gpu_model.py``). Stages, each run as subprocesses under its own time cap, in this order:

1. the CUDA kernel tests: ``tests/kernels/test_kernels_cuda.py`` (the compiled Triton kernels on the GPU) and
   ``tests/kernels/test_kernels_triton.py``, with TRITON_INTERPRET unset; pass/fail counts;
2. the divergence kernels (``bench/gpu_divergence.py``): forward + backward of forward KL, reverse KL and JSD at
   N=16384, V=151936, bf16, against naive PyTorch and Liger-Kernel on the same inputs; ms, share of the measured
   device copy bandwidth, peak memory;
3. the training step (``bench/step.py``'s workers, ``bench/trl_peer.py``): bf16-mixed self-distillation with the
   reference solution and GRPO, 32 rollouts of up to 512 new tokens, LoRA r=64, sdlit against TRL's SDFT and GRPO
   trainers, and sdlit without its fused output head; s/step, tokens/s, peak GPU memory, sdlit's phases;
4. rollout generation: sdlit's sampler against plain ``generate`` at 32 and 256 rows, tokens/s;
5. one ``sdlit fit`` step with ``--trainer.strategy fsdp2`` (FSDP2) on the one GPU per teacher setup (base with
   LoRA, base and EMA with full fine-tuning, current).

A stage's cap is its share of ``--time-limit`` plus what the stages before it left unused; a stage cut at its cap
keeps what it measured, and both files are rewritten after every subprocess, so a later failure loses nothing
before it. ``--dry-run`` runs every stage on CPU at tiny shapes (seconds each) and says what it skipped.

    python bench/gpu_check.py --out "$OUT"                          # on the GPU machine (see docs/gpu.md)
    python bench/gpu_check.py --dry-run --out /tmp/gpu-check        # on CPU, tiny shapes
    python bench/gpu_check.py --dry-run --stages 2,3 --out /tmp/gpu-check
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench"), str(ROOT)]  # the bench scripts beside this one; this checkout's sdlit
import gpu_stages  # noqa: E402
import gpu_step_stages  # noqa: E402

STAGES = {  # number -> (title, function, share of the time limit)
    1: ("CUDA kernel tests", gpu_stages.kernel_tests, 60 / 480),
    2: ("divergence kernels against naive PyTorch and Liger-Kernel", gpu_stages.divergence, 75 / 480),
    3: ("training step against TRL", gpu_step_stages.training_step, 225 / 480),
    4: ("rollout generation", gpu_step_stages.generation, 60 / 480),
    5: ("FSDP2 on one GPU, each teacher setup", gpu_stages.fsdp, 60 / 480),
}
MIN_STAGE_SECONDS = 10  # a stage with less time left than this is reported as not run
PACKAGES = ("torch", "transformers", "lightning", "peft", "triton", "trl", "liger-kernel", "torchmetrics", "datasets",
            "jsonargparse", "sdlit")
MACHINE_PROBE = """
import json, os, platform, torch
info = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
        "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}",
                gpus=torch.cuda.device_count())
print("RESULT " + json.dumps(info))
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for gpu_check.md, gpu_check.json and logs/")
    p.add_argument("--dry-run", action="store_true", help="every stage on CPU at tiny shapes, CUDA-only parts skipped")
    p.add_argument("--stages", default="1,2,3,4,5", help="comma-separated stage numbers to run, e.g. 2,3")
    p.add_argument("--time-limit", type=float, default=480.0,
                   help="seconds for all stages together; each stage's cap is its share plus what earlier ones left")
    args = p.parse_args(argv)
    args.stages = sorted({int(s) for s in args.stages.split(",") if s.strip()})
    unknown = [s for s in args.stages if s not in STAGES]
    if unknown:
        p.error(f"unknown stage(s) {unknown}; stages are {list(STAGES)}")
    return args


@dataclass
class Run:
    """One finished (or killed) subprocess: exit code, wall seconds, its ``RESULT`` JSON and its log file."""

    rc: int | None
    seconds: float
    timed_out: bool
    result: dict | None
    log: Path

    def error(self) -> str:
        """The most telling line of the log: the last exception line, else its last line."""
        lines = [line.strip() for line in self.log.read_text(errors="replace").splitlines() if line.strip()]
        if self.timed_out:
            return f"cut at the stage's time cap after {self.seconds:.0f} s"
        errors = [line for line in lines if re.match(r"[\w.]*(Error|Exception)\b", line)]
        return (errors or lines or [f"exit code {self.rc}"])[-1][:400]

    def summary(self, expects_result: bool = True) -> dict:
        """What the report keeps of the run; ``error`` when it failed (or gave no ``RESULT`` line, if it should)."""
        out = {"rc": self.rc, "seconds": self.seconds, "timed_out": self.timed_out, "result": self.result,
               "log": self.log.name}
        if self.rc != 0 or (expects_result and self.result is None):
            out["error"] = self.error()
        return out


class Check:
    """The run's state: options, output files, the current stage's deadline, the shared random-weight model."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.dry_run = args.dry_run
        self.out = Path(args.out)
        self.logs = self.out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix="sdlit-gpu-check-"))
        self.deadline = time.monotonic()
        self.model_info: dict = {}
        self.report = {"started": datetime.datetime.now().isoformat(timespec="seconds"), "dry_run": self.dry_run,
                       "time_limit_s": args.time_limit, "stages_asked": args.stages, "machine": {},
                       "versions": package_versions(), "stages": {}}

    def env(self) -> dict:
        """The workers' environment: this checkout first on the path, offline, compiled (not interpreted) Triton."""
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
        env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   TOKENIZERS_PARALLELISM="false", TRL_EXPERIMENTAL_SILENCE="1", PYTHONUNBUFFERED="1")
        return env

    def run(self, command: list[str], name: str) -> Run:
        """Run ``command`` (log to logs/NAME.log) until it ends or the stage's deadline; kill its process group then."""
        log = self.logs / f"{name}.log"
        start = time.monotonic()
        with log.open("w") as handle:
            proc = subprocess.Popen(command, cwd=ROOT, env=self.env(), stdout=handle, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                rc, timed_out = proc.wait(timeout=max(1.0, self.deadline - time.monotonic())), False
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):  # it may have ended just now
                    os.killpg(proc.pid, signal.SIGKILL)
                rc, timed_out = proc.wait(), True
        results = [line for line in log.read_text(errors="replace").splitlines() if line.startswith("RESULT ")]
        result = json.loads(results[-1].removeprefix("RESULT ")) if results and not timed_out else None
        return Run(None if timed_out else rc, time.monotonic() - start, timed_out, result, log)

    def model_dir(self) -> Path:
        """The random-weight model (built once, by the first stage that needs it, within that stage's cap)."""
        path = self.tmp / "model"
        if not self.model_info:
            shape = "tiny" if self.dry_run else "qwen3-1.7b"
            run = self.run([sys.executable, str(ROOT / "bench" / "gpu_model.py"), "--out", str(path), "--shape", shape],
                           "model_build")
            if run.result is None:
                raise RuntimeError(f"building the random-weight model failed: {run.error()}")
            self.model_info = run.result
            self.report["model"] = run.result
        return path

    def write(self) -> None:
        """Rewrite gpu_check.json and gpu_check.md with everything so far."""
        plain = {k: v for k, v in self.report.items() if k != "stages"}
        plain["stages"] = {n: {k: v for k, v in s.items() if k != "markdown"} for n, s in self.report["stages"].items()}
        (self.out / "gpu_check.json").write_text(json.dumps(plain, indent=1, default=str) + "\n")
        (self.out / "gpu_check.md").write_text("\n".join(markdown(self.report)) + "\n")


def package_versions() -> dict:
    """Installed versions (None: not installed), read from package metadata without importing anything."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def machine(check: Check) -> dict:
    """Python, CPUs and the GPU, probed in a subprocess (this process never initialises CUDA)."""
    check.deadline = time.monotonic() + 60
    run = check.run([sys.executable, "-c", MACHINE_PROBE], "machine")
    info = run.result or {"error": run.error()}
    info.setdefault("host", platform.node())
    return info


def run_stage(check: Check, number: int, seconds: float) -> None:
    """Run one stage with ``seconds`` as its cap; record its status, time and any error."""
    title, function, _ = STAGES[number]
    stage = {"title": title, "status": None, "cap_s": round(seconds, 1), "figures": {}, "notes": [], "details": {},
             "markdown": []}
    check.report["stages"][str(number)] = stage
    check.deadline = time.monotonic() + seconds
    start = time.monotonic()
    if seconds < MIN_STAGE_SECONDS:
        stage["status"] = "timeout"
        stage["notes"].append(f"not run: {seconds:.0f} s left of --time-limit {check.args.time_limit:.0f}")
    else:
        try:
            function(check, stage)
        except Exception as err:  # a broken stage is reported; the stages after it still run
            stage["status"], stage["error"] = "failed", f"{type(err).__name__}: {err}"
    stage["seconds"] = round(time.monotonic() - start, 1)
    check.write()
    print(f"stage {number} ({title}): {stage['status']} in {stage['seconds']:.0f} s", file=sys.stderr, flush=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    check = Check(args)
    try:
        check.report["machine"] = machine(check)
        check.write()
        start = time.monotonic()
        end = start + args.time_limit
        for index, number in enumerate(args.stages):
            later = sum(STAGES[n][2] * args.time_limit for n in args.stages[index + 1:])
            run_stage(check, number, max(0.0, end - time.monotonic() - later))
        check.report["seconds"] = round(time.monotonic() - start, 1)
        check.write()
    finally:
        shutil.rmtree(check.tmp, ignore_errors=True)
    print(f"wrote {check.out / 'gpu_check.md'} and {check.out / 'gpu_check.json'}", file=sys.stderr)


# ---- the report --------------------------------------------------------------------------------------------------
def markdown(report: dict) -> list[str]:
    m, v = report["machine"], report["versions"]
    device = (f"{m.get('gpu')} ({m.get('gpu_memory_gib')} GiB, compute capability {m.get('capability')})"
              if m.get("gpu") else "no CUDA device")
    lines = [
        "# GPU check" + (" (dry run on CPU)" if report["dry_run"] else ""),
        "",
        f"Written by `python bench/gpu_check.py{' --dry-run' if report['dry_run'] else ''}`, started "
        f"{report['started']}, time limit {report['time_limit_s']:.0f} s.",
        "",
        f"Machine: {device}; {m.get('cpus')} CPUs; Python {m.get('python')}; CUDA (torch) {m.get('torch_cuda')}.",
        "",
        "Versions: " + ", ".join(f"{k} {val or 'not installed'}" for k, val in v.items()) + ".",
    ]
    if report.get("model"):
        info = report["model"]
        lines += ["", f"Model: random-weight `{info['shape']}` ({info['parameters'] / 1e6:,.1f}M parameters, "
                      f"vocabulary {info['vocab_size']}), built in {info['seconds']:.0f} s."]
    lines += ["", "| stage | status | seconds | cap s |", "|---|---|---|---|"]
    for number, stage in report["stages"].items():
        lines.append(f"| {number}. {stage['title']} | {stage['status']} | {stage.get('seconds', '')} | "
                     f"{stage['cap_s']} |")
    for number, stage in report["stages"].items():
        lines += ["", f"## {number}. {stage['title']}: {stage['status']}", ""]
        lines += [f"- {note}" for note in stage["notes"]]
        if stage.get("error"):
            lines.append(f"- error: {stage['error']}")
        lines += [""] + stage["markdown"]
    return lines


if __name__ == "__main__":
    main()
