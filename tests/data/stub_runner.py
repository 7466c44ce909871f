"""A fast stand-in for ppo/cpg/vpg_continuous.py in the reproduce.py tests: the flags reproduce.py
passes, the same summary.json statuses, exit codes, checkpoint and --resume rules, no training.

Behaviour by run name: STUB_PLAN is JSON {substring of the run name: behaviour}, behaviour one of
complete (default), sleep (STUB_SLEEP seconds, then complete; SIGINT/SIGTERM: interrupted, 130),
explode (3), error (1), crash (exit 1 with the summary left at 'running', like a killed process), or a
list of these, one per call (the last repeats): ["error", "complete"] fails once.
Every call appends its pid and argv to {run dir}/calls.txt, which the tests count, and starts a new
TensorBoard event file, as SummaryWriter does. A fresh run writes checkpoint.pt (its argv) at once, as
the scripts do at their first iteration, and removes it when it completes; `--resume RUN_DIR` (no other
flag) continues from it, refused with exit 2 when the run is finished or has no checkpoint.
"""
import argparse
import json
import os
import signal
import sys
import time

p = argparse.ArgumentParser()
for flag in ("--log-dir", "--run-name", "--env-id", "--resume"):
    p.add_argument(flag)
p.add_argument("--seed", type=int)
p.add_argument("--total-timesteps", type=int)
args, _ = p.parse_known_args()
resume = args.resume


def status_of(run_dir):
    try:
        with open(os.path.join(run_dir, "summary.json")) as f:
            return json.load(f)["status"]
    except OSError:
        return None


if resume:
    if len(sys.argv) != 3 or status_of(resume) in ("completed", "exploded") or not os.path.exists(
            os.path.join(resume, "checkpoint.pt")):
        print(f"error: cannot resume: {' '.join(sys.argv[1:])}, status {status_of(resume)}", file=sys.stderr)
        sys.exit(2)
    with open(os.path.join(resume, "checkpoint.pt")) as f:
        args, _ = p.parse_known_args(json.load(f))
run_dir = resume or os.path.join(args.log_dir, args.run_name)
os.makedirs(run_dir, exist_ok=True)
with open(os.path.join(run_dir, "calls.txt"), "a") as f:
    f.write(f"{os.getpid()} {' '.join(sys.argv[1:])}\n")
with open(os.path.join(run_dir, "calls.txt")) as f:
    n_calls = len(f.readlines())
open(os.path.join(run_dir, f"events.out.tfevents.{time.time():.0f}.stub.{os.getpid()}"), "w").close()
if not resume:
    with open(os.path.join(run_dir, "checkpoint.pt"), "w") as f:
        json.dump(sys.argv[1:], f)
plan = json.loads(os.environ.get("STUB_PLAN") or "{}")
behaviour = next((b for key, b in plan.items() if key in os.path.basename(run_dir)), "complete")
if isinstance(behaviour, list):
    behaviour = behaviour[min(n_calls, len(behaviour)) - 1]


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
    os.remove(os.path.join(run_dir, "checkpoint.pt"))
    sys.exit(0)
if behaviour == "explode":
    summary("exploded", 1000, explosion_step=1000, final_return=None)
    sys.exit(3)
if behaviour == "error":
    summary("error", 0, error="RuntimeError: stub")
sys.exit(1)  # error, or crash with a 'running' summary
