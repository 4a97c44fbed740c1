"""Benchmark sdlit.kernels against naive PyTorch: time and peak memory of forward + backward.

    python bench/divergence.py                         # CPU: N=2048, V=49152, fp32
    python bench/divergence.py --device cuda           # GPU: N=8192, V in {49152, 151936}, bf16
    python bench/divergence.py --shapes 512x8192 --kind jsd --dtype bfloat16 --repeats 3

Variants (each forward + backward of loss.sum(), or loss.mean() with --reduction mean):
- naive_logits: log_softmax of both logits + explicit sum, plain autograd (baseline of the logit variants).
- fallback: sdlit.kernels.per_token_divergence(backend="torch") on the same logits (chunked PyTorch).
- triton: per_token_divergence(backend="triton") (CUDA only).
- naive_hidden: student logits = hidden @ W.T (with grad), teacher logits under no_grad, naive loss
  (baseline of fused_linear).
- fused_linear: sdlit.kernels.fused_linear_divergence from the hidden states and W, default backend
  (Triton on CUDA, the PyTorch fallback on CPU).
On CUDA the logit variants also print the achieved bandwidth, counting 3 x N x V x itemsize bytes (read
both logits, write the gradient once) per forward + backward, against the H100's 3.35 TB/s.

Memory: tracemalloc does not see torch's CPU allocations, so on CPU each variant runs in a fresh
subprocess that builds its inputs (in place, so no transient above them), reads its resident set size
(VmRSS in /proc/self/status), runs one forward + backward and reads the peak (VmHWM; not getrusage's
ru_maxrss, which a child inherits from its parent across fork + exec and so reports the parent's peak).
The delta is the extra peak memory of one step beyond its inputs, as the OS saw it. The subprocess
runs with MALLOC_MMAP_THRESHOLD_=65536 and MALLOC_ARENA_MAX=1 so that glibc maps every tensor above
64 KiB on its own and unmaps it when freed: resident memory then tracks the live tensors. (Without this,
freed blocks stay in glibc's per-thread heaps and the numbers vary by hundreds of MiB between runs;
torch.profiler's memory events missed most autograd-time allocations here.)
On a CUDA device, torch.cuda.max_memory_allocated is used instead (exact allocator peak), in this process.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from sdlit.kernels import fused_linear_divergence, per_token_divergence  # noqa: E402
from sdlit.kernels.dispatch import resolve_backend  # noqa: E402

LOGIT_VARIANTS = ("naive_logits", "fallback", "triton")
HIDDEN_VARIANTS = ("naive_hidden", "fused_linear")
BASELINE = {"fallback": "naive_logits", "triton": "naive_logits", "fused_linear": "naive_hidden"}
H100_BANDWIDTH = 3.35e12  # bytes per second (H100 SXM HBM3)
CPU_SHAPES = "2048x49152"
CUDA_SHAPES = "8192x49152,8192x151936"


def naive_loss(student_logits, teacher_logits, kind, temperature=1.0):
    """Full-size reference loss per row (forward/reverse KL, symmetric JSD), autograd for backward."""
    lq = F.log_softmax(student_logits.float() / temperature, dim=-1)
    lp = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if kind == "forward_kl":
        return (lp.exp() * (lp - lq)).sum(-1)
    if kind == "reverse_kl":
        return (lq.exp() * (lq - lp)).sum(-1)
    lm = torch.logaddexp(lp, lq) - torch.log(torch.tensor(2.0))
    return 0.5 * (lp.exp() * (lp - lm)).sum(-1) + 0.5 * (lq.exp() * (lq - lm)).sum(-1)


def _randn(shape, scale, generator, dtype, device):
    """Random tensor built in place, so that making inputs has no transient peak above the inputs."""
    out = torch.empty(shape, dtype=torch.float32).normal_(generator=generator).mul_(scale)
    return out.to(device, dtype)


def _proc_status_kib(field):
    """A memory field of /proc/self/status in KiB: VmRSS (current) or VmHWM (peak of this process image)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status (Linux only)")


def make_inputs(variant, args):
    """Inputs of one variant: a closure that runs forward + backward once."""
    g = torch.Generator().manual_seed(0)
    dtype, device = getattr(torch, args.dtype), args.device
    reduce = torch.sum if args.reduction == "sum" else torch.mean
    if variant in LOGIT_VARIANTS:
        s = _randn((args.n, args.v), 2.0, g, dtype, device).requires_grad_(True)
        t = _randn((args.n, args.v), 2.0, g, dtype, device)
        backend = "torch" if variant == "fallback" else "triton"

        def step():
            s.grad = None
            if variant == "naive_logits":
                loss = naive_loss(s, t, args.kind)
            else:
                loss = per_token_divergence(s, t, kind=args.kind, backend=backend)
            reduce(loss).backward()

        return step
    hs = _randn((args.n, args.h), 1.0, g, dtype, device).requires_grad_(True)
    ht = _randn((args.n, args.h), 1.0, g, dtype, device)
    w = _randn((args.v, args.h), args.h**-0.5, g, dtype, device).requires_grad_(True)

    def step():
        hs.grad, w.grad = None, None
        if variant == "naive_hidden":
            with torch.no_grad():
                t_logits = ht @ w.T
            loss = naive_loss(hs @ w.T, t_logits, args.kind)
        else:
            loss = fused_linear_divergence(hs, ht, w, kind=args.kind)
        reduce(loss).backward()

    return step


def measure_memory(variant, args):
    """Run one step and return the extra peak memory in MiB (see module docstring)."""
    tiny = argparse.Namespace(**{**vars(args), "n": 4, "v": 64, "h": 8})
    make_inputs(variant, tiny)()  # load kernels and thread pools first, so they are not counted
    step = make_inputs(variant, args)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20
        del step
        torch.cuda.empty_cache()
        return peak
    before = _proc_status_kib("VmRSS")
    step()
    return (_proc_status_kib("VmHWM") - before) / 1024


def measure_time(variant, args):
    """Best (minimum) seconds of forward + backward over args.repeats runs after one warm-up.

    The minimum is the least disturbed by other processes sharing the machine.
    """
    step = make_inputs(variant, args)
    step()
    times = []
    for _ in range(args.repeats):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def memory_in_subprocess(variant, shape, argv):
    """Peak-memory delta of `variant` at `shape` measured in a fresh Python process (CPU)."""
    cmd = [sys.executable, __file__, *argv, "--shapes", shape, "--_memory-only", variant]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_ARENA_MAX": "1"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])["mib"]


def parse_args(argv):
    """Command line: shapes, kind, dtype, device, repeats, reduction."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=None, help=f"NxV,... (default {CPU_SHAPES} on CPU, {CUDA_SHAPES} on CUDA)")
    p.add_argument("--h", type=int, default=576, help="hidden size (fused_linear only)")
    p.add_argument("--kind", default="forward_kl", choices=("forward_kl", "reverse_kl", "jsd"))
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="default float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--reduction", default="sum", choices=("sum", "mean"), help="loss.sum() or loss.mean()")
    p.add_argument("--_memory-only", dest="memory_only", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.shapes = args.shapes or (CUDA_SHAPES if cuda else CPU_SHAPES)
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    return args


def _shape_args(args, shape):
    """A copy of args with n and v of one 'NxV' shape."""
    n, v = (int(x) for x in shape.lower().split("x"))
    return argparse.Namespace(**{**vars(args), "n": n, "v": v})


def bench_shape(args, shape, argv):
    """Time and memory of every variant at one shape; prints one table."""
    cuda = args.device.startswith("cuda")
    shaped = _shape_args(args, shape)
    variants = [v for v in LOGIT_VARIANTS if cuda or v != "triton"] + list(HIDDEN_VARIANTS)
    results = {}
    for variant in variants:
        sec = measure_time(variant, shaped)
        mib = measure_memory(variant, shaped) if cuda else memory_in_subprocess(variant, shape, argv)
        results[variant] = (sec, mib)
    print(f"\nN={shaped.n} V={shaped.v} H={args.h} kind={args.kind} dtype={args.dtype} loss.{args.reduction}()")
    header = f"{'variant':<14}{'fwd+bwd ms':>12}{'peak extra MiB':>16}{'time ratio':>12}{'mem ratio':>11}"
    print(header + (f"{'TB/s':>8}{'of 3.35':>9}" if cuda else ""))
    item = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    for variant, (sec, mib) in results.items():
        base = BASELINE.get(variant, variant)
        t_ratio = f"{sec / results[base][0]:.2f}x"
        m_ratio = f"{mib / max(results[base][1], 1e-9):.2f}x"
        line = f"{variant:<14}{sec * 1e3:>12.2f}{mib:>16.1f}{t_ratio:>12}{m_ratio:>11}"
        if cuda and variant in LOGIT_VARIANTS:
            rate = 3 * shaped.n * shaped.v * item / sec
            line += f"{rate / 1e12:>8.2f}{rate / H100_BANDWIDTH:>9.0%}"
        print(line)


def main(argv=None):
    """Print time and peak memory of every variant and the ratios to its naive baseline, per shape."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.memory_only:
        print(json.dumps({"mib": measure_memory(args.memory_only, _shape_args(args, args.shapes))}))
        return
    cuda = args.device.startswith("cuda")
    device_name = torch.cuda.get_device_name() if cuda else platform.processor() or "cpu"
    print(
        f"device={args.device} ({device_name}, {torch.get_num_threads()} threads) torch={torch.__version__} "
        f"kernel backend on this device: {resolve_backend('auto', torch.empty(0, device=args.device))}"
    )
    for shape in args.shapes.split(","):
        bench_shape(args, shape, _drop_option(argv, "--shapes"))
    print("ratios: fallback and triton vs naive_logits, fused_linear vs naive_hidden (lower is better)")


def _drop_option(argv, name):
    """argv without `name VALUE` / `name=VALUE` (the subprocess gets its own --shapes)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == name:
            skip = True
        elif not a.startswith(name + "="):
            out.append(a)
    return out


if __name__ == "__main__":
    main()
