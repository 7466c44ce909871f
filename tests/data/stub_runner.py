"""A fast stand-in for ppo/cpg/vpg_continuous.py in the reproduce.py tests: the flags reproduce.py
passes, the same summary.json statuses and exit codes, no training.

Behaviour by run name: STUB_PLAN is JSON {substring of the run name: behaviour}, behaviour one of
complete (default), sleep (STUB_SLEEP seconds, then complete; SIGINT/SIGTERM: interrupted, 130),
explode (3), error (1), error-once (error on the first call, then complete), crash (exit 1 with the
summary left at 'running', like a killed process). Every call appends its pid and argv to
{run dir}/calls.txt, which the tests count.
"""
import argparse
import json
import os
import signal
import sys
import time

p = argparse.ArgumentParser()
for flag in ("--log-dir", "--run-name", "--env-id"):
    p.add_argument(flag)
p.add_argument("--seed", type=int)
p.add_argument("--total-timesteps", type=int)
args, _ = p.parse_known_args()
run_dir = os.path.join(args.log_dir, args.run_name)
os.makedirs(run_dir, exist_ok=True)
with open(os.path.join(run_dir, "calls.txt"), "a") as f:
    f.write(f"{os.getpid()} {' '.join(sys.argv[1:])}\n")
with open(os.path.join(run_dir, "calls.txt")) as f:
    n_calls = len(f.readlines())
plan = json.loads(os.environ.get("STUB_PLAN") or "{}")
behaviour = next((b for key, b in plan.items() if key in args.run_name), "complete")
if behaviour == "error-once":
    behaviour = "error" if n_calls == 1 else "complete"


def summary(status, step, **fields):
    s = {"algo": os.path.basename(sys.argv[0]).split("_")[0], "env_id": args.env_id, "seed": args.seed,
         "args": {"total_timesteps": args.total_timesteps}, "status": status, "global_step": step,
         "total_timesteps": args.total_timesteps, "exploded": status == "exploded", "explosion_step": None,
         "final_return": 10.0 * args.seed, "max_return": 10.0 * args.seed + 5, "max_log10_ratio": 1.0, **fields}
    path = os.path.join(run_dir, "summary.json")
    with open(path + ".tmp", "w") as f:
        json.dump(s, f)
    os.replace(path + ".tmp", path)


def raise_interrupt(*_):
    raise KeyboardInterrupt


signal.signal(signal.SIGTERM, raise_interrupt)
print(f"stub {behaviour} call {n_calls}", flush=True)
print("stub stderr line", file=sys.stderr, flush=True)
summary("running", 0)
if behaviour == "sleep":
    try:
        time.sleep(float(os.environ.get("STUB_SLEEP", "60")))
    except KeyboardInterrupt:
        summary("interrupted", 500)
        sys.exit(130)
    behaviour = "complete"
if behaviour == "complete":
    summary("completed", args.total_timesteps)
    sys.exit(0)
if behaviour == "explode":
    summary("exploded", 1000, explosion_step=1000, final_return=None)
    sys.exit(3)
if behaviour == "error":
    summary("error", 0, error="RuntimeError: stub")
sys.exit(1)  # error, or crash with a 'running' summary
