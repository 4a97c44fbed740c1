"""Benchmark sdlit.kernels against naive PyTorch: time and peak memory of forward + backward.

    python bench/divergence.py [--n 2048 --v 49152 --h 576 --kind forward_kl --dtype float32 --repeats 5]

Variants (each forward + backward of loss.sum()):
- naive_logits: log_softmax of both logits + explicit sum, plain autograd (baseline of per_token).
- per_token: sdlit.kernels.per_token_divergence on the same logits.
- naive_hidden: student logits = hidden @ W.T (with grad), teacher logits under no_grad, naive loss
  (baseline of fused_linear).
- fused_linear: sdlit.kernels.fused_linear_divergence from the hidden states and W.

Memory: tracemalloc does not see torch's CPU allocations, so each variant runs in a fresh subprocess
that builds its inputs (in place, so no transient above them), reads its resident set size (VmRSS in
/proc/self/status), runs one forward + backward and reads the peak (VmHWM; not getrusage's ru_maxrss,
which a child inherits from its parent across fork + exec and so reports the parent's peak).
The delta is the extra peak memory of one step beyond its inputs, as the OS saw it. The subprocess
runs with MALLOC_MMAP_THRESHOLD_=65536 and MALLOC_ARENA_MAX=1 so that glibc maps every tensor above
64 KiB on its own and unmaps it when freed: resident memory then tracks the live tensors. (Without this,
freed blocks stay in glibc's per-thread heaps and the numbers vary by hundreds of MiB between runs;
torch.profiler's memory events missed most autograd-time allocations here.)
On a CUDA device, torch.cuda.max_memory_allocated is used instead (exact allocator peak).
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

VARIANTS = ("naive_logits", "per_token", "naive_hidden", "fused_linear")
BASELINE = {"per_token": "naive_logits", "fused_linear": "naive_hidden"}


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
    if variant in ("naive_logits", "per_token"):
        s = _randn((args.n, args.v), 2.0, g, dtype, device).requires_grad_(True)
        t = _randn((args.n, args.v), 2.0, g, dtype, device)
        fn = naive_loss if variant == "naive_logits" else None

        def step():
            s.grad = None
            loss = naive_loss(s, t, args.kind) if fn else per_token_divergence(s, t, kind=args.kind)
            loss.sum().backward()

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
        loss.sum().backward()

    return step


def measure_memory(variant, args):
    """Run one step in this process and return the extra peak memory in MiB (see module docstring)."""
    tiny = argparse.Namespace(**{**vars(args), "n": 4, "v": 64, "h": 8})
    make_inputs(variant, tiny)()  # load kernels and thread pools first, so they are not counted
    step = make_inputs(variant, args)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
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


def memory_in_subprocess(variant, argv):
    """Peak-memory delta of `variant` measured in a fresh Python process."""
    cmd = [sys.executable, __file__, *argv, "--_memory-only", variant]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_ARENA_MAX": "1"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])["mib"]


def parse_args(argv):
    """Command line: shape, kind, dtype, device, repeats."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2048, help="rows (tokens)")
    p.add_argument("--v", type=int, default=49152, help="vocabulary size")
    p.add_argument("--h", type=int, default=576, help="hidden size (fused_linear only)")
    p.add_argument("--kind", default="forward_kl", choices=("forward_kl", "reverse_kl", "jsd"))
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--_memory-only", dest="memory_only", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    """Print time and peak memory of every variant and the ratios to its naive baseline."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.memory_only:
        print(json.dumps({"mib": measure_memory(args.memory_only, args)}))
        return
    threads = torch.get_num_threads()
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(
        f"shape N={args.n} V={args.v} H={args.h} kind={args.kind} dtype={args.dtype} "
        f"device={args.device} ({device_name}, {threads} threads) torch={torch.__version__}"
    )
    results = {}
    for variant in VARIANTS:
        results[variant] = (measure_time(variant, args), memory_in_subprocess(variant, argv))
    print(f"{'variant':<14}{'fwd+bwd ms':>12}{'peak extra MiB':>16}{'time ratio':>12}{'mem ratio':>11}")
    for variant, (sec, mib) in results.items():
        base = BASELINE.get(variant)
        t_ratio = f"{sec / results[base][0]:.2f}x" if base else "1.00x"
        m_ratio = f"{mib / max(results[base][1], 1e-9):.2f}x" if base else "1.00x"
        print(f"{variant:<14}{sec * 1e3:>12.1f}{mib:>16.1f}{t_ratio:>12}{m_ratio:>11}")
    print("ratios: per_token vs naive_logits, fused_linear vs naive_hidden (lower is better)")


if __name__ == "__main__":
    main()
