"""sdlit's divergence kernels against naive PyTorch and Liger-Kernel on the same inputs (stage 2 of gpu_check.py).

For each kind (forward_kl, reverse_kl, jsd), one forward + backward on the same bf16 inputs:

from logits [N, V] (the student's gets the gradient):
- ``naive``: log_softmax of both in fp32 and the explicit sum (``bench/divergence.py``'s ``naive_loss``), autograd;
- ``sdlit``: ``sdlit.kernels.per_token_divergence(...).sum()`` (Triton on CUDA, the PyTorch fallback on CPU);
- ``liger_jsd``: Liger takes log-probabilities, so ``torch.log_softmax`` of both (bf16 out, fp32 inside) then
  ``LigerJSD`` with beta 0 (forward KL), 1 (reverse KL) or 0.5 (JSD; beta is the teacher's share of the mixture, as
  in sdlit), the log_softmax backward included;
- ``liger_kl_div`` (forward_kl only): the same log_softmax, then ``LigerKLDIVLoss(reduction="sum", log_target=True)``.

from hidden states [N, H] and one output head W [V, H] (trainable: the gradients of the student's hidden states
and of W are computed):
- ``naive``: logits ``h @ W.T`` (the teacher's under no_grad), then the naive loss;
- ``sdlit``: ``sdlit.kernels.fused_linear_divergence``;
- ``liger_fused_linear_jsd``: ``LigerFusedLinearJSD(jsd_beta=beta)(h_student, W, h_teacher, W, None)``.

Time: median of ``--repeats`` calls after one warm-up call (CUDA events; ``perf_counter`` on CPU). Peak memory (CUDA
only): ``torch.cuda.max_memory_allocated`` during one call minus what was allocated before it (the inputs). The logit
variants' bandwidth counts 3 x N x V x 2 bytes per call (read both logits, write the gradient once), as a share of a
device-to-device copy measured in the same run that moves as many bytes. ``loss_per_token`` (the loss divided by N;
Liger's is already a mean) shows that the variants compute the same thing. Each variant's failure (e.g. out of
memory) is recorded and the others still run; the JSON is rewritten after every measurement.

    python bench/gpu_divergence.py --json /tmp/div.json                                      # CUDA: N=16384, V=151936
    python bench/gpu_divergence.py --device cpu --n 64 --v 1000 --h 32 --json /tmp/div.json  # a dry run
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from divergence import naive_loss  # bench/divergence.py, beside this file

from sdlit.kernels import fused_linear_divergence, per_token_divergence
from sdlit.kernels.dispatch import resolve_backend

KINDS = ("forward_kl", "reverse_kl", "jsd")
LIGER_BETA = {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": 0.5}  # Liger's beta 0 / 1: forward / reverse KL
JSD_BETA = 0.5
MEAN_VARIANTS = ("liger_jsd", "liger_fused_linear_jsd")  # Liger's JSD losses are means over the rows, not sums


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--n", type=int, default=16384, help="tokens (rows)")
    p.add_argument("--v", type=int, default=151936, help="vocabulary size")
    p.add_argument("--h", type=int, default=2048, help="hidden size (the fused linear variants)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    p.add_argument("--json", required=True, help="where the results go (rewritten after every measurement)")
    return p.parse_args(argv)


# ---- measuring ---------------------------------------------------------------------------------------------------
def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, repeats: int, device: str) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` calls after one warm-up call."""
    fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start_s = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start_s) * 1e3)
    return statistics.median(times)


def peak_extra_mib(fn, clear, device: str) -> float | None:
    """Peak memory of one ``fn()`` above what was allocated before it, in MiB (CUDA only; None elsewhere)."""
    if device != "cuda":
        return None
    clear()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def copy_bandwidth(moved_bytes: int, dtype: torch.dtype, repeats: int, device: str) -> dict:
    """Device-to-device copy (``dst.copy_(src)``) moving ``moved_bytes`` (read + write): GB/s."""
    item = torch.empty((), dtype=dtype).element_size()
    numel = moved_bytes // (2 * item)
    src = torch.ones(numel, dtype=dtype, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), repeats, device)
    moved = 2 * numel * item
    return {"bytes_moved": moved, "ms": ms, "gb_per_s": moved / ms / 1e6}


def normal(shape, scale: float, dtype: torch.dtype, device: str, generator, grad: bool = False) -> torch.Tensor:
    """A normal tensor drawn in place in ``dtype`` (no fp32 transient of its size)."""
    out = torch.empty(shape, dtype=dtype, device=device).normal_(0.0, scale, generator=generator)
    return out.requires_grad_(grad)


# ---- the variants ------------------------------------------------------------------------------------------------
def liger_unavailable(device: str, *modules: str) -> str | None:
    """Why Liger-Kernel's variants cannot run here (no CUDA, not installed, or one of ``modules`` does not import),
    or None when they can."""
    if device != "cuda":
        return "Liger-Kernel's Triton kernels need a CUDA device"
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger_kernel is not installed"
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as err:
            return f"liger_kernel does not import: {err}"
    return None


def logit_variants(kind: str, device: str) -> dict:
    """name -> loss(student_logits, teacher_logits) -> scalar, or name -> str (why it is skipped)."""
    variants = {
        "naive": lambda s, t: naive_loss(s, t, kind).sum(),
        "sdlit": lambda s, t: per_token_divergence(s, t, kind=kind, beta=JSD_BETA).sum(),
    }
    reason = liger_unavailable(device, "liger_kernel.transformers.jsd", "liger_kernel.transformers.kl_div")
    if reason:
        variants["liger_jsd"] = reason
        return variants
    from liger_kernel.transformers.jsd import LigerJSD
    from liger_kernel.transformers.kl_div import LigerKLDIVLoss

    jsd = LigerJSD(beta=LIGER_BETA[kind])
    variants["liger_jsd"] = lambda s, t: jsd(F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1))
    if kind == "forward_kl":  # kl_div(log q, log p) = KL(p || q): forward KL only (no gradient to the target)
        kl_div = LigerKLDIVLoss(reduction="sum", log_target=True)
        variants["liger_kl_div"] = lambda s, t: kl_div(F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1))
    return variants


def hidden_variants(kind: str, device: str) -> dict:
    """name -> loss(student_hidden, teacher_hidden, weight) -> scalar, or name -> str (why it is skipped)."""

    def naive(hs, ht, w):
        with torch.no_grad():
            teacher_logits = ht @ w.T
        return naive_loss(hs @ w.T, teacher_logits, kind).sum()

    variants = {"naive": naive,
                "sdlit": lambda hs, ht, w: fused_linear_divergence(hs, ht, w, kind=kind, beta=JSD_BETA).sum()}
    reason = liger_unavailable(device, "liger_kernel.transformers.fused_linear_jsd")
    if reason:
        variants["liger_fused_linear_jsd"] = reason
        return variants
    from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD

    fused = LigerFusedLinearJSD(jsd_beta=LIGER_BETA[kind])
    variants["liger_fused_linear_jsd"] = lambda hs, ht, w: fused(hs, w, ht, w, None)
    return variants


def measure(loss_fn, inputs: list[torch.Tensor], args, per_call_bytes: int | None, copy: dict, mean: bool) -> dict:
    """Time, peak memory and loss (per token; ``mean``: the loss is a mean already) of one variant's forward +
    backward on ``inputs``."""
    trainable = [x for x in inputs if x.requires_grad]

    def clear():
        for x in trainable:
            x.grad = None

    losses = []

    def step():
        clear()
        loss = loss_fn(*inputs)
        loss.backward()
        losses.append(loss.detach())

    row = {"ms": median_ms(step, args.repeats, args.device)}
    mib = peak_extra_mib(step, clear, args.device)
    if mib is not None:
        row["peak_extra_mib"] = mib
    value = float(losses[0])
    row["loss_per_token"] = value if mean else value / args.n
    if per_call_bytes:
        row["gb_per_s"] = per_call_bytes / row["ms"] / 1e6
        row["share_of_copy"] = row["gb_per_s"] / copy["gb_per_s"]
    clear()
    return row


def run_variants(variants: dict, inputs: list[torch.Tensor], meta: dict, args, per_call_bytes, copy, record) -> None:
    """Measure every variant (or record why it is skipped / what failed) and hand each row to ``record``."""
    for name, fn in variants.items():
        row = dict(meta, variant=name)
        if isinstance(fn, str):
            row["skipped"] = fn
        else:
            try:
                row.update(measure(fn, inputs, args, per_call_bytes, copy, name in MEAN_VARIANTS))
            except Exception as err:  # out of memory, a kernel that does not compile, ...: the others still run
                row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
            if args.device == "cuda":
                torch.cuda.empty_cache()
        record(row)


# ---- main --------------------------------------------------------------------------------------------------------
def main(argv=None) -> None:
    """Measure everything, rewriting ``--json`` after each measurement."""
    args = parse_args(argv)
    dtype = getattr(torch, args.dtype)
    item = torch.empty((), dtype=dtype).element_size()
    per_call_bytes = 3 * args.n * args.v * item
    report = {"device": args.device, "n": args.n, "v": args.v, "h": args.h, "dtype": args.dtype,
              "repeats": args.repeats, "backend": resolve_backend("auto", torch.empty(0, device=args.device)),
              "liger_skipped": liger_unavailable(args.device), "rows": []}
    out = Path(args.json)

    def record(row: dict) -> None:
        report["rows"].append(row)
        out.write_text(json.dumps(report, indent=1) + "\n")
        print(json.dumps(row), flush=True)

    report["copy"] = copy = copy_bandwidth(per_call_bytes, dtype, args.repeats, args.device)
    if args.device == "cuda":
        torch.cuda.empty_cache()  # the copy's buffers
    out.write_text(json.dumps(report, indent=1) + "\n")
    generator = torch.Generator(args.device).manual_seed(0)
    student = normal((args.n, args.v), 2.0, dtype, args.device, generator, grad=True)
    teacher = normal((args.n, args.v), 2.0, dtype, args.device, generator)
    for kind in args.kinds:
        run_variants(logit_variants(kind, args.device), [student, teacher], {"kind": kind, "input": "logits"}, args,
                     per_call_bytes, copy, record)
    del student, teacher
    hs = normal((args.n, args.h), 1.0, dtype, args.device, generator, grad=True)
    ht = normal((args.n, args.h), 1.0, dtype, args.device, generator)
    weight = normal((args.v, args.h), args.h**-0.5, dtype, args.device, generator, grad=True)
    for kind in args.kinds:
        run_variants(hidden_variants(kind, args.device), [hs, ht, weight], {"kind": kind, "input": "hidden"}, args,
                     None, copy, record)


if __name__ == "__main__":
    main()
