"""Training speed (environment steps per second) of ppo_continuous.py against Stable-Baselines3's PPO, and
of our --cuda against our CPU.

Against SB3: both run with the same hyperparameters (CleanRL's, which both can express), networks, thread
settings and step budget, alternately in this one invocation, each in a fresh process; the ratio is
ours / SB3, of the medians over --repeats. SPS is given by wall time and by the process's CPU time: on a
shared machine the CPU-time figure is the one less disturbed by other load. Both leave start-up out: ours
is the summary's (start-up is what the script's train() does before its first env step), SB3's is timed
around learn(). SB3 is installed on the fly if missing (it is not a dependency here).

--cuda: the headline command, cpg_continuous.py with the paper's settings, on the GPU (CUDA graphs, the
default) against the same on --cpu-cores pinned CPU cores (taskset, as many torch threads), and against plain
eager CUDA (--no-cuda-graphs), alternately; medians over --repeats. No SB3 is needed. SPS is measured at
steady state: from the TensorBoard timestamps of the run's per-iteration scalars, over the iterations
after the first --warmup-iterations. The summary's SPS already leaves out process start, CUDA start-up,
graph capture and cuBLAS initialisation (the scripts' start-up); the steady state also leaves out whatever
else the first iterations do once (short runs would otherwise understate --cuda).

    python benchmarks/bench_sps.py                      # the three cases below, 1 thread each
    python benchmarks/bench_sps.py --threads 2 --steps 40960
    python benchmarks/bench_sps.py --cuda               # GPU against 4 pinned CPU cores, Humanoid and Hopper
    python benchmarks/bench_sps.py --cuda --steps 5000 --repeats 1 --json /tmp/sps.json
"""
import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# (env id, policy hidden widths, target ratio ours/SB3 from the issue)
CASES = {
    "hopper-64x64": ("Hopper-v4", [64, 64], 1.5),
    "hopper-1024": ("Hopper-v4", [1024], 1.5),
    "humanoid-1024x1024": ("Humanoid-v4", [1024, 1024], 1.0),
}
# CleanRL's PPO hyperparameters, which both implementations can express exactly
NUM_STEPS, MINIBATCH, EPOCHS, LR, MAX_GRAD_NORM = 2048, 64, 10, 3e-4, 0.5
CLEANRL_FLAGS = ["--value-hidden", "64", "64", "--num-steps", str(NUM_STEPS), "--minibatch-size", str(MINIBATCH),
                 "--update-epochs", str(EPOCHS), "--learning-rate", str(LR), "--max-grad-norm", str(MAX_GRAD_NORM),
                 "--norm-adv", "--std-param", "exp", "--min-std", "0", "--init-std", "1", "--logprob-at", "raw"]
# --cuda: (env id, policy hidden widths, target ratio GPU / pinned CPU, target ratio graphs / eager CUDA)
CUDA_CASES = {
    "humanoid-1024x1024": ("Humanoid-v4", [1024, 1024], 2.5, 1.0),
    "hopper-64x64": ("Hopper-v4", [64, 64], 1.0, None),
}
CUDA_ROLLOUT = 1000  # the paper's --num-steps: one iteration, and one TensorBoard point, per 1000 steps

SB3_RUN = """
import sys, time, json, torch
from stable_baselines3 import PPO
env_id, hidden, steps, device = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
model = PPO("MlpPolicy", env_id, n_steps={num_steps}, batch_size={minibatch}, n_epochs={epochs}, learning_rate={lr},
            gamma=0.99, gae_lambda=0.95, clip_range=0.2, ent_coef=0.0, vf_coef=0.5, max_grad_norm={max_grad_norm},
            normalize_advantage=True, device=device, seed=1,
            policy_kwargs=dict(net_arch=dict(pi=hidden, vf=[64, 64]), activation_fn=torch.nn.Tanh, log_std_init=0.0))
start, start_cpu = time.perf_counter(), time.process_time()
model.learn(total_timesteps=steps)
wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
print(json.dumps({{"sps": model.num_timesteps / wall, "cpu_sps": model.num_timesteps / cpu}}))
""".format(num_steps=NUM_STEPS, minibatch=MINIBATCH, epochs=EPOCHS, lr=LR, max_grad_norm=MAX_GRAD_NORM)


def ensure_sb3():
    if importlib.util.find_spec("stable_baselines3") is None:
        print("installing stable-baselines3 for the comparison ...", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "stable-baselines3"], check=True)


def thread_env(threads):
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "PYTHONWARNINGS": "ignore"}


def ours(env_id, hidden, steps, threads, flags=CLEANRL_FLAGS, script="ppo_continuous.py", cpus=None, warmup=None):
    """One run in a fresh process: its summary's SPS by wall and CPU time (start-up left out) and, with
    `warmup`, the steady-state SPS after that many iterations."""
    with tempfile.TemporaryDirectory() as log_dir:
        command = [sys.executable, str(ROOT / script), "--env-id", env_id, "--policy-hidden", *map(str, hidden),
                   "--total-timesteps", str(steps), *flags, "--log-dir", log_dir, "--run-name", "bench"]
        if cpus:
            command = ["taskset", "-c", cpus, *command]
        subprocess.run(command, env=thread_env(threads), check=True, capture_output=True, text=True)
        summary = json.loads((Path(log_dir) / "bench" / "summary.json").read_text())
        result = {"sps": summary["sps"],
                  "cpu_sps": summary["global_step"] / (summary["cpu_time_s"] - summary["startup_cpu_s"])}
        if warmup is not None:
            result["steady_sps"] = sps_after_warmup(iteration_times(Path(log_dir) / "bench"), warmup)
        return result


def iteration_times(run_dir, tag="charts/SPS"):
    """(global step, wall time) at the end of each iteration: the TensorBoard timestamps of a scalar the
    scripts log once per iteration."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return [(event.step, event.wall_time) for event in events.Scalars(tag)]


def sps_after_warmup(points, warmup):
    """Steps per second from the end of iteration `warmup` (1-based) to the end of the last one."""
    points = sorted(points)
    if warmup < 1 or len(points) < warmup + 1:
        raise ValueError(f"a warm-up of {warmup} iteration(s) needs more than {warmup} logged; the run logged {len(points)}")
    (step0, time0), (step1, time1) = points[warmup - 1], points[-1]
    return (step1 - step0) / (time1 - time0)


def failure(error):
    """One line for a failed run: its command's last stderr line."""
    lines = (getattr(error, "stderr", None) or str(error)).strip().splitlines() or [repr(error)]
    return f"{type(error).__name__}: {lines[-1][:300]}"


def sb3(env_id, hidden, steps, threads):
    output = subprocess.run([sys.executable, "-c", SB3_RUN, env_id, json.dumps(hidden), str(steps), "cpu"],
                            env=thread_env(threads), check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def medians(runs):
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def cuda_comparison(args):
    import torch

    if not torch.cuda.is_available():
        sys.exit("error: --cuda needs a CUDA GPU")
    cores = f"0-{args.cpu_cores - 1}"
    print(f"cpg_continuous.py, paper settings, {args.steps} steps per run, SPS after {args.warmup_iterations} "
          f"warm-up iteration(s) of {CUDA_ROLLOUT} steps, median of {args.repeats} alternating runs; "
          f"{torch.cuda.get_device_name()}, torch {torch.__version__}; CPU side: cores {cores} (taskset), "
          f"{args.cpu_cores} threads; started {time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    print(f"{'case':<20}{'--cuda':>8}{'eager CUDA':>11}{'CPU':>8}{'cuda/CPU':>10}{'target':>8}"
          f"{'cuda/eager':>12}{'target':>8}", flush=True)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "steps": args.steps,
              "warmup_iterations": args.warmup_iterations, "repeats": args.repeats, "cpu_cores": args.cpu_cores,
              "cases": {}}
    for name in args.cases:
        env_id, hidden, cpu_target, eager_target = CUDA_CASES[name]
        sides = {"cuda": dict(flags=["--cuda"], threads=1), "eager": dict(flags=["--cuda", "--no-cuda-graphs"], threads=1),
                 "cpu": dict(flags=[], threads=args.cpu_cores, cpus=cores)}
        runs, errors = {side: [] for side in sides}, {}
        for _ in range(args.repeats):
            for side, how in sides.items():
                try:  # a failing side is reported, the others are still measured
                    runs[side].append(ours(env_id, hidden, args.steps, how["threads"], how["flags"], "cpg_continuous.py",
                                           how.get("cpus"), args.warmup_iterations)["steady_sps"])
                except (subprocess.CalledProcessError, OSError, ValueError, KeyError) as error:
                    errors[side] = failure(error)
        case = report["cases"][name] = case_report(name, runs, errors)
        if args.json:  # rewritten after each case, so a cut-short run keeps what it measured
            Path(args.json).write_text(json.dumps(report, indent=1))
        sps, versus_cpu, versus_eager = case["sps"], case["cuda_over_cpu"], case["cuda_over_eager"]
        cell = lambda x, f: format(x, f) if x is not None else "-"  # noqa: E731
        print(f"{name:<20}{cell(sps['cuda'], '>8.0f')}{cell(sps['eager'], '>11.0f')}{cell(sps['cpu'], '>8.0f')}"
              f"{cell(versus_cpu, '>10.2f')}{'>=' + str(cpu_target):>8}{cell(versus_eager, '>12.2f')}"
              f"{'>' + str(eager_target) if eager_target else '':>8} {'ok' if case['met'] else 'MISSED'}", flush=True)
        for side, error in errors.items():
            print(f"  {side} failed: {error}", flush=True)


def case_report(name, runs, errors):
    """A --cuda case's results: steady-state SPS per side ('cuda', 'eager', 'cpu'; median of its runs, None
    if none ran), the ratios and whether they meet the case's targets."""
    env_id, hidden, cpu_target, eager_target = CUDA_CASES[name]
    sps = {side: statistics.median(values) if values else None for side, values in runs.items()}
    ratio = lambda a, b: sps[a] / sps[b] if sps[a] and sps[b] else None  # noqa: E731
    versus_cpu, versus_eager = ratio("cuda", "cpu"), ratio("cuda", "eager")
    met = (versus_cpu is not None and versus_cpu >= cpu_target
           and (not eager_target or (versus_eager is not None and versus_eager > eager_target)))
    return {"env_id": env_id, "policy_hidden": hidden, "sps": sps, "runs": runs, "errors": errors,
            "cuda_over_cpu": versus_cpu, "cuda_over_eager": versus_eager, "target_cuda_over_cpu": cpu_target,
            "target_cuda_over_eager": eager_target, "met": met}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", choices=list(dict.fromkeys([*CASES, *CUDA_CASES])), metavar="CASE",
                        help=f"default: {' '.join(CASES)}; with --cuda: {' '.join(CUDA_CASES)}")
    parser.add_argument("--steps", type=int, help=f"environment steps per run (default {10 * NUM_STEPS}; --cuda: 10000)")
    parser.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads, the same for both")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each side, alternating")
    parser.add_argument("--cuda", action="store_true", help="ours --cuda against ours on pinned CPU cores (no SB3)")
    parser.add_argument("--cpu-cores", type=int, default=4, help="--cuda: cores (and threads) of the CPU side")
    parser.add_argument("--warmup-iterations", type=int, default=1,
                        help=f"--cuda: iterations ({CUDA_ROLLOUT} steps each) left out of the SPS, at least 1")
    parser.add_argument("--json", metavar="PATH", help="--cuda: also write the results to PATH as JSON")
    args = parser.parse_args()
    cases = CUDA_CASES if args.cuda else CASES
    args.cases = args.cases or list(cases)
    if not set(args.cases) <= set(cases):
        parser.error(f"--cases: choose from {' '.join(cases)}")
    if args.cuda:
        args.steps = args.steps or 10000
        if args.warmup_iterations < 1:
            parser.error("--warmup-iterations must be at least 1")
        if args.steps < (args.warmup_iterations + 1) * CUDA_ROLLOUT:
            parser.error(f"--steps must cover the warm-up and at least one more iteration: "
                         f"{(args.warmup_iterations + 1) * CUDA_ROLLOUT} or more")
        return cuda_comparison(args)
    args.steps = args.steps or 10 * NUM_STEPS
    if args.steps < NUM_STEPS or args.steps % NUM_STEPS:
        parser.error(f"--steps must be a positive multiple of the rollout length {NUM_STEPS}")
    ensure_sb3()
    print(f"{args.steps} steps per run, {args.threads} thread(s), rollout {NUM_STEPS}, minibatch {MINIBATCH}, "
          f"{EPOCHS} epochs, median of {args.repeats} alternating runs; started {time.strftime('%Y-%m-%d %H:%M')}",
          flush=True)
    print(f"{'case':<20}{'ours SPS':>9}{'SB3 SPS':>9}{'ratio':>7}   {'ours CPU-SPS':>12}{'SB3 CPU-SPS':>12}{'ratio':>7}"
          f"{'target':>8}", flush=True)
    for name in args.cases:
        env_id, hidden, target = CASES[name]
        our_runs, sb3_runs = [], []
        for _ in range(args.repeats):
            our_runs.append(ours(env_id, hidden, args.steps, args.threads))
            sb3_runs.append(sb3(env_id, hidden, args.steps, args.threads))
        our, base = medians(our_runs), medians(sb3_runs)
        ratio, cpu_ratio = our["sps"] / base["sps"], our["cpu_sps"] / base["cpu_sps"]
        verdict = "ok" if min(ratio, cpu_ratio) >= target else "MISSED"
        print(f"{name:<20}{our['sps']:>9.0f}{base['sps']:>9.0f}{ratio:>7.2f}   {our['cpu_sps']:>12.0f}"
              f"{base['cpu_sps']:>12.0f}{cpu_ratio:>7.2f}{'>=' + str(target):>8} {verdict}", flush=True)


if __name__ == "__main__":
    main()
