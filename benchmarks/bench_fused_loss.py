"""Forward+backward time of the policy surrogate: eager surrogate_reference, torch.compile of it,
and the fused extension, measured side by side in one run. Each round times one block of
consecutive calls per method (as torch.utils.benchmark does, so the timer's own cost and one-off
stalls are spread over the block), and the methods take turns in every round, so load from other
processes hits all three alike. Prints the median per-call time over rounds and the ratios
eager/ext and compiled/ext; on CUDA also the extension's achieved bandwidth against the device's peak.

    python benchmarks/bench_fused_loss.py                      # cpu (+ cuda when present), ppo and cpg
    python benchmarks/bench_fused_loss.py --kind ppo --device cuda --peak-gbs 3350
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fused_loss as F  # noqa: E402


def peak_gbs(device):
    """Theoretical DRAM bandwidth from the device properties (DDR: two transfers per clock)."""
    p = torch.cuda.get_device_properties(device)
    clock_khz, bus_bits = getattr(p, "memory_clock_rate", 0), getattr(p, "memory_bus_width", 0)
    return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9 if clock_khz and bus_bits else None


def timed(fn, leaf, old, adv, kind, eps, sync, calls):
    """Seconds per call, over a block of `calls` consecutive forward+backward calls."""
    sync()
    t = time.perf_counter()
    for _ in range(calls):
        leaf.grad = None
        loss, _ = fn(leaf, old, adv, eps, kind)  # stats are computed either way
        loss.backward()
    sync()
    return (time.perf_counter() - t) / calls


def bench(device, kind, n, dtype, eps, methods, rounds, block_s):
    """Median seconds per call of each method, and the block size (calls) and rounds used."""
    g = torch.Generator().manual_seed(0)
    old = -1.0 - torch.rand(n, generator=g, dtype=dtype)
    new = old + 0.3 * torch.randn(n, generator=g, dtype=dtype)
    adv = torch.randn(n, generator=g, dtype=dtype)
    leaf, old, adv = new.to(device).requires_grad_(), old.to(device), adv.to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    run = lambda fn, calls: timed(fn, leaf, old, adv, kind, eps, sync, calls)  # noqa: E731
    per_call = {}
    for name, fn in methods.items():  # warm-up: compilation, allocator, caches, the interpreter's specialisation
        start, warm_calls = time.perf_counter(), 0
        while warm_calls < 2 or time.perf_counter() - start < 0.2:  # the last call is past compilation
            per_call[name] = run(fn, 1)
            warm_calls += 1
    # one block size for all methods, from the slowest: every block lasts about block_s
    slowest = max(per_call.values())
    calls = max(1, round(block_s / slowest))
    rounds = rounds or max(5, min(30, round(1.0 / (calls * slowest))))
    times = {name: [] for name in methods}
    for _ in range(rounds):
        for name, fn in methods.items():
            times[name].append(run(fn, calls))
    return {name: statistics.median(t) for name, t in times.items()}, calls, rounds


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", default="ppo,cpg", help="comma-separated: ppo, cpg, is, vpg")
    ap.add_argument("--sizes", default="64,4096,65536,1048576,16777216")
    ap.add_argument("--device", default="cpu,cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--clip-coef", type=float, default=0.2)
    ap.add_argument("--rounds", type=int, default=0, help="timed rounds per size (0: about 1 s of the slowest method, 5 to 30)")
    ap.add_argument("--block-ms", type=float, default=5.0, help="timed block of consecutive calls, ms of the slowest method")
    ap.add_argument("--peak-gbs", type=float, default=None, help="device peak memory bandwidth, GB/s")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    F.load_extension(required=True)
    dtype = getattr(torch, args.dtype)
    # one compiled graph per (kind, size): allow more recompiles than the default
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    methods = {"eager": F.surrogate_reference}
    if not args.no_compile:
        methods["compiled"] = torch.compile(F.surrogate_reference, dynamic=False)
    methods["ext"] = lambda *a: F.surrogate(*a, backend="extension")

    print(f"# torch {torch.__version__}, {torch.get_num_threads()} CPU threads, {args.dtype}, clip_coef {args.clip_coef}")
    print(f"# {F.backend_info()}")
    # least traffic of forward+backward: read new_logp, old_logp, advantages and write the
    # gradient (forward), read it and write grad_out x gradient (backward)
    print("# forward+backward, median over rounds of the time per call in a block of `calls`; times in ms;"
          " GB/s = 6 N itemsize / ext time")
    cols = "device kind N calls rounds " + " ".join(f"{m}_ms" for m in methods) + " eager/ext" + (" compiled/ext" if "compiled" in methods else "")
    print("| " + " | ".join(cols.split()) + " | GB/s | % peak |")
    print("|" + "---|" * (len(cols.split()) + 2))
    for device in args.device.split(","):
        peak = args.peak_gbs or (peak_gbs(torch.device(device)) if device == "cuda" else None)
        if device == "cuda":
            print(f"# {torch.cuda.get_device_name()}, peak {peak or 'unknown (pass --peak-gbs)'} GB/s")
        for kind in args.kind.split(","):
            for n in map(int, args.sizes.split(",")):
                t, calls, rounds = bench(device, kind, n, dtype, args.clip_coef, methods, args.rounds,
                                         args.block_ms / 1e3)
                gbs = 6 * n * dtype.itemsize / t["ext"] / 1e9
                row = [device, kind, n, calls, rounds, *(f"{t[m] * 1e3:.3f}" for m in methods), f"{t['eager'] / t['ext']:.1f}x"]
                if "compiled" in t:
                    row.append(f"{t['compiled'] / t['ext']:.1f}x")
                row += [f"{gbs:.1f}", f"{100 * gbs / peak:.0f}" if peak else "-"]
                print("| " + " | ".join(map(str, row)) + " |", flush=True)


if __name__ == "__main__":
    main()
