"""Forward+backward time of the policy surrogate: eager surrogate_reference, torch.compile of it,
and the fused extension, measured side by side in one run. Each round times one block of
consecutive calls per method (as torch.utils.benchmark does, so the timer's own cost and one-off
stalls are spread over the block), and the methods take turns in every round, so load from other
processes hits all three alike. Prints the median per-call wall time over rounds and the ratios
eager/ext and compiled/ext.

On CUDA also the extension's kernels alone: forward+backward (and forward only) captured in a CUDA
graph and replayed between CUDA events, so no host work is in the timing; their bandwidth,
6 N itemsize bytes over that time, as a percentage of a device copy of the same size (2 N itemsize
bytes, timed the same way in the same run).

    python benchmarks/bench_fused_loss.py                      # cpu (+ cuda when present), ppo and cpg
    python benchmarks/bench_fused_loss.py --device cuda --no-compile --json /tmp/fused.json
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fused_loss as F  # noqa: E402


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


def inputs(n, dtype, device):
    g = torch.Generator().manual_seed(0)
    old = -1.0 - torch.rand(n, generator=g, dtype=dtype)
    new = old + 0.3 * torch.randn(n, generator=g, dtype=dtype)
    adv = torch.randn(n, generator=g, dtype=dtype)
    return new.to(device).requires_grad_(), old.to(device), adv.to(device)


def bench(device, kind, n, dtype, eps, methods, rounds, block_s):
    """Median wall seconds per call of each method, and the block size (calls) and rounds used."""
    leaf, old, adv = inputs(n, dtype, device)
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


def graph_seconds(step, reps, rounds=10):
    """Device seconds per call of `step`, from CUDA events around replays of one CUDA graph holding
    `reps` calls: launch overhead and the host are out of the timing."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graph asks
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            step()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(rounds):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / reps)
    return statistics.median(times)


def kernel_times(kind, n, dtype, eps, wall_s):
    """CUDA: (fwd+bwd, fwd only, copy) device seconds per call of the extension and of a copy of N."""
    leaf, old, adv = inputs(n, dtype, "cuda")
    src, dst = old.clone(), torch.empty_like(old)

    def forward():
        leaf.grad = None
        return F.surrogate(leaf, old, adv, eps, kind, backend="extension")[0]

    reps = max(1, min(100, round(2e-3 / wall_s)))  # about 2 ms of calls per replay
    return (graph_seconds(lambda: forward().backward(), reps), graph_seconds(forward, reps),
            graph_seconds(lambda: dst.copy_(src), reps))


def result_row(device, kind, n, dtype, calls, rounds, wall, kernels=None):
    """One row of results: wall seconds per call by method and, on CUDA, the kernels' (fwd+bwd, fwd, copy)
    device seconds per call."""
    row = {"device": device, "kind": kind, "n": n, "dtype": str(dtype).removeprefix("torch."), "calls": calls,
           "rounds": rounds, "wall_ms": {m: t * 1e3 for m, t in wall.items()}, "eager_over_ext": wall["eager"] / wall["ext"]}
    if "compiled" in wall:
        row["compiled_over_ext"] = wall["compiled"] / wall["ext"]
    if kernels:
        both, fwd, copy = kernels
        gbs, copy_gbs = 6 * n * dtype.itemsize / both / 1e9, 2 * n * dtype.itemsize / copy / 1e9
        row.update(kernel_ms=both * 1e3, fwd_kernel_ms=fwd * 1e3, gbs=gbs, copy_gbs=copy_gbs, pct_copy=100 * gbs / copy_gbs)
    return row


def cells(row, methods):
    out = [row["device"], row["kind"], row["n"], row["calls"], row["rounds"],
           *(f"{row['wall_ms'][m]:.3f}" for m in methods), f"{row['eager_over_ext']:.1f}x"]
    if "compiled_over_ext" in row:
        out.append(f"{row['compiled_over_ext']:.1f}x")
    if "pct_copy" in row:
        return out + [f"{row['kernel_ms']:.4f}", f"{row['fwd_kernel_ms']:.4f}", f"{row['gbs']:.0f}",
                      f"{row['copy_gbs']:.0f}", f"{row['pct_copy']:.0f}"]
    return out + ["-"] * 5


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", default="ppo,cpg", help="comma-separated: ppo, cpg, is, vpg")
    ap.add_argument("--sizes", default="64,4096,65536,1048576,16777216",
                    help="comma-separated numbers of elements N (the minibatch size of a training step)")
    ap.add_argument("--device", default="cpu,cuda" if torch.cuda.is_available() else "cpu",
                    help="comma-separated: cpu, cuda (default: cpu, and cuda when a GPU is visible)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--clip-coef", type=float, default=0.2)
    ap.add_argument("--rounds", type=int, default=0, help="timed rounds per size (0: about 1 s of the slowest method, 5 to 30)")
    ap.add_argument("--block-ms", type=float, default=5.0, help="timed block of consecutive calls, ms of the slowest method")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--json", metavar="PATH", help="also write the rows to PATH as JSON (rewritten after each row)")
    args = ap.parse_args()
    devices = args.device.split(",")
    if not set(devices) <= {"cpu", "cuda"}:
        ap.error(f"--device: choose from cpu, cuda; got {args.device}")
    if "cuda" in devices and not torch.cuda.is_available():
        sys.exit("error: --device cuda needs a CUDA GPU")
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
    print("# wall: forward+backward, median over rounds of the time per call in a block of `calls`; times in ms")
    print("# cuda kernels: device time per call in a replayed CUDA graph; GB/s = 6 N itemsize / fwd+bwd kernel time;"
          " % copy = that against a copy of N (2 N itemsize bytes) timed alike")
    cols = ["device", "kind", "N", "calls", "rounds", *(f"{m}_ms" for m in methods), "eager/ext",
            *(["compiled/ext"] if "compiled" in methods else []), "kernel_ms", "fwd_kernel_ms", "GB/s", "copy GB/s",
            "% copy"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    rows = []
    for device in devices:
        if device == "cuda":
            print(f"# {torch.cuda.get_device_name()}")
        for kind in args.kind.split(","):
            for n in map(int, args.sizes.split(",")):
                wall, calls, rounds = bench(device, kind, n, dtype, args.clip_coef, methods, args.rounds,
                                            args.block_ms / 1e3)
                kernels = kernel_times(kind, n, dtype, args.clip_coef, wall["ext"]) if device == "cuda" else None
                rows.append(result_row(device, kind, n, dtype, calls, rounds, wall, kernels))
                print("| " + " | ".join(map(str, cells(rows[-1], methods))) + " |", flush=True)
                if args.json:
                    Path(args.json).write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
