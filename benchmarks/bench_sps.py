"""Training speed (environment steps per second) of ppo_continuous.py against Stable-Baselines3's PPO.

Both run with the same hyperparameters, networks, thread settings and step budget, alternately in this
one invocation, each in a fresh process; the ratio is ours / SB3, of the medians over --repeats. SPS is
given by wall time and by the process's CPU time: on a shared machine the CPU-time figure is the one
less disturbed by other load. SB3 is installed on the fly if missing (it is not a dependency here).

    python benchmarks/bench_sps.py                      # the three cases below, 1 thread each
    python benchmarks/bench_sps.py --threads 2 --steps 40960
    python benchmarks/bench_sps.py --cuda               # adds ours --cuda against ours on the CPU (Humanoid)
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


def ours(env_id, hidden, steps, threads, cuda=False):
    with tempfile.TemporaryDirectory() as log_dir:
        command = [sys.executable, str(ROOT / "ppo_continuous.py"), "--env-id", env_id,
                   "--policy-hidden", *map(str, hidden), "--value-hidden", "64", "64", "--total-timesteps", str(steps),
                   "--num-steps", str(NUM_STEPS), "--minibatch-size", str(MINIBATCH), "--update-epochs", str(EPOCHS),
                   "--learning-rate", str(LR), "--max-grad-norm", str(MAX_GRAD_NORM), "--norm-adv",
                   "--std-param", "exp", "--min-std", "0", "--init-std", "1", "--logprob-at", "raw",
                   "--log-dir", log_dir, "--run-name", "bench", *(["--cuda"] if cuda else [])]
        subprocess.run(command, env=thread_env(threads), check=True, capture_output=True)
        summary = json.loads((Path(log_dir) / "bench" / "summary.json").read_text())
        return {"sps": summary["sps"], "cpu_sps": summary["global_step"] / summary["cpu_time_s"]}


def sb3(env_id, hidden, steps, threads):
    output = subprocess.run([sys.executable, "-c", SB3_RUN, env_id, json.dumps(hidden), str(steps), "cpu"],
                            env=thread_env(threads), check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def medians(runs):
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--steps", type=int, default=10 * NUM_STEPS, help="environment steps per run")
    parser.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads, the same for both")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each side, alternating")
    parser.add_argument("--cuda", action="store_true", help="also time ours with --cuda on Humanoid [1024, 1024]")
    args = parser.parse_args()
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
    if args.cuda:
        env_id, hidden, _ = CASES["humanoid-1024x1024"]
        cpu = ours(env_id, hidden, args.steps, args.threads)["sps"]
        gpu = ours(env_id, hidden, args.steps, args.threads, cuda=True)["sps"]
        print(f"ours on Humanoid-v4 [1024, 1024]: --cuda {gpu:.0f} SPS, CPU {cpu:.0f} SPS, ratio {gpu / cpu:.2f}",
              flush=True)


if __name__ == "__main__":
    main()
