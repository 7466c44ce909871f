"""The paper's experiments as grids of training runs: list them, run them, report them.

    python reproduce.py list mean-transform                  # one command line per run, and who shares it
    python reproduce.py run mean-transform --workers 2       # runs what is missing; rerun to resume
    python reproduce.py report mean-transform                # {out}/mean-transform/report.md + figures

An experiment is a list of cells (algorithm x environment x flags), each run once per seed as a
subprocess of ppo_continuous.py / cpg_continuous.py / vpg_continuous.py. Everything not set by the
cell is the scripts' default, which is the paper's (Tables 3, 4, Appendix A.3). A run is its effective
command line (script, env, seed, budget and the flags that differ from the defaults) and lives once in
the shared store {out}/runs/{algo}__{env}__{flag=value...}__{budget}__s{seed}/ (summary.json, TensorBoard
events, train.log, checkpoint.pt while unfinished), so a run that several experiments have is trained
once and reported in each. {out}/{experiment}/ holds grid.json, report.md and the figures. Options not
given to run/report are taken from the experiment's last `run` ({out}/{experiment}/grid.json), so
`report` after `run --seeds 3` reports 3 seeds. An interrupted run is continued from its checkpoint.
See docs/reproduce.md.
"""
import argparse
import fcntl
import itertools
import json
import logging
import math
import os
import shlex
import signal
import subprocess
import sys
import time
import warnings

import numpy as np

STEPS = 1_000_000  # the paper does not state its budget; 1M steps is the usual MuJoCo benchmark
SEEDS = 5  # paper: five seeds per setting
ENVS = ["Hopper-v4", "Walker2d-v4", "Humanoid-v4"]
WIDE = {"Hopper-v4": [1024], "Walker2d-v4": [1024, 1024], "Humanoid-v4": [1024, 1024]}  # Table 3 policies
DONE = ("completed", "exploded")  # finished runs: never run again
# new runs evaluate the deterministic policy this often; the evaluation flags are not part of a run's identity
EVAL_EVERY = 100_000
STABILITY = ["stability/max_log10_ratio", "stability/log10_kl", "stability/min_std", "stability/policy_l2_from_init"]


def grid(algos, envs, axes=None):
    """Cells algo x env x product(axes); the policy is the paper's per-env width unless an axis sets it."""
    axes = axes or {}
    return [(algo, env, {"policy-hidden": WIDE[env], **dict(zip(axes, values))})
            for algo in algos for env in envs for values in itertools.product(*axes.values())]


HOPPER, WALKER, HUMANOID = ["Hopper-v4"], ["Walker2d-v4"], ["Humanoid-v4"]
EXPERIMENTS = {
    "mean-transform": dict(
        paper="Table 1", cells=grid(["ppo"], ENVS, {"mean-transform": ["clip", "tanh", "none"]}),
        what="PPO with the Gaussian mean mapped into the action box by clipping or tanh (scaled to the box: "
             "0.4 tanh on Humanoid) or left free. Keeping the mean inside the box should prevent the explosions."),
    "vpg": dict(
        paper="Table 2", cells=grid(["vpg"], ENVS),
        what="Vanilla policy gradient (log-prob times advantage, no importance ratio) with the large policies: "
             "poor returns, but it should never explode."),
    "reward-scale": dict(
        paper="Table 6", cells=grid(["ppo"], HOPPER, {"reward-scale": [1.0, 0.1, 0.01, 0.001]}),
        what="PPO on Hopper-v4 with the rewards scaled before learning: the explosion rate does not fall "
             "monotonically with the scale, so large rewards are not the root cause."),
    "constraints": dict(
        paper="Fig. 3", steps=100_000, cells=grid(["ppo"], HUMANOID, {"mean-shift": [100.0],
                                                                      "objective": ["clip", "kl-penalty", "none"]}),
        figure=dict(file="kl_and_ratio.png", tags=["stability/log10_kl"], x="stability/max_log10_ratio"),
        what="PPO on Humanoid-v4 with the mean shifted out of the box by c = 100 (Appendix A.2) under ratio "
             "clipping, the KL penalty (Eq. 12) and no constraint, at 100k steps (the paper plots a few hundred "
             "optimization steps): log10 KL stays small while the max log10 ratio overflows. kl_and_ratio.png: log10 KL against the max log10 ratio, a point per "
             "update, coloured by objective. With the mean shifted by 100, every objective explodes in its first "
             "update (clip too, see shifted-mean), so each run is one point; large-nets' Humanoid figure has the "
             "unshifted runs' KL and ratio over training."),
    "small-nets": dict(
        paper="Fig. 4", cells=grid(["ppo", "cpg"], ENVS, {"policy-hidden": [[64, 64]]}),
        what="PPO vs CPG (clipped log-ratio objective, Eq. 15) with [64, 64] policies, where nothing should "
             "explode: the two should reach comparable returns."),
    "large-nets": dict(
        paper="Fig. 2, 5, 6", cells=grid(["ppo", "cpg"], ENVS),
        figure=dict(file="humanoid_ppo_ratio_and_std.png", only="ppo__Humanoid-v4", x="steps",
                    tags=["stability/max_log10_ratio", "stability/min_std", "stability/log10_kl"]),
        what="PPO vs CPG with the paper's large policies: PPO explodes with huge max log10 ratios (Fig. 2) "
             "before the std gets small (Fig. 6); CPG keeps learning (Fig. 5). humanoid_ppo_ratio_and_std.png: "
             "PPO on Humanoid-v4, a line per run, as Figs. 2 and 6, and its log10 KL (Fig. 3a without a mean shift)."),
    "learning-rate": dict(
        paper="Fig. 7a", cells=grid(["ppo"], WALKER, {"learning-rate": [1e-4, 3e-5, 1e-5]}),
        what="PPO on Walker2d-v4 at learning rates 1e-4 (the paper's default), 3e-5 and 1e-5 (the paper does "
             "not give its values; these are ours): returns fall as the learning rate falls."),
    "optimizer-width": dict(
        paper="Fig. 7b,c", cells=grid(["ppo"], HOPPER, {"optimizer": ["adam", "sgd"],
                                                       "policy-hidden": [[64], [256], [1024]]}),
        figure=dict(file="l2_from_init.png", tags=["stability/policy_l2_from_init"], by="optimizer", x="steps"),
        what="PPO on Hopper-v4, Adam vs SGD (both at the default learning rate 1e-4; the paper gives no SGD rate) "
             "with one hidden layer of width 64, 256 or 1024: the distance of the mean network's outputs from "
             "initialisation (stability/policy_l2_from_init) grows faster with width under Adam. "
             "l2_from_init.png: that distance against steps, Adam and SGD side by side, as Figs. 7b and 7c."),
    "shifted-mean": dict(
        paper="Appendix A.2, Fig. 8c", cells=grid(["ppo", "cpg", "vpg"], HUMANOID, {"mean-shift": [100.0]}),
        tags=STABILITY + ["stability/mean_abs_advantage"],
        what="Humanoid-v4 with the mean shifted out of the box by c = 100: the mean |advantage| does not decay "
             "to zero (Fig. 8c plots it on a log10 scale, around 10^1) while the max log10 ratio grows. Which "
             "algorithms explode, and when."),
    "logprob-at": dict(
        paper="ours", cells=grid(["ppo", "cpg"], ENVS, {"logprob-at": ["clipped", "raw"]}),
        what="PPO and CPG with the paper's large policies storing the log-prob of the clipped action (paper) or of "
             "the raw sample (CleanRL, SB3): does storing the raw sample alone remove the explosions?"),
    "squash": dict(
        paper="ours", cells=grid(["ppo", "cpg"], ENVS, {"squash": ["none", "tanh"]}),
        what="PPO and CPG with the paper's large policies, the Gaussian's actions clipped to the box (paper) or "
             "squashed by tanh (SAC-style, log-prob with the tanh Jacobian): the tanh-squashed Gaussian never "
             "evaluates a density at a clipped action; does PPO still explode?"),
    "returns-gap": dict(
        paper="ours", cells=[("vpg", "Hopper-v4", {"policy-hidden": [1024], "minibatch-size": 64}),
                             ("vpg", "Hopper-v4", {"policy-hidden": [1024], "minibatch-size": 64, "update-epochs": 10}),
                             ("vpg", "Hopper-v4", {"policy-hidden": [1024], "minibatch-size": 64, "logprob-at": "raw"}),
                             *grid(["ppo"], HOPPER, {"norm-obs": [True], "reward-scale": [1.0, 0.1]}),
                             *grid(["ppo"], HOPPER, {"norm-obs": [True], "norm-reward": [True]})],
        what="Settings the paper does not state, tried on Hopper-v4 [1024] to explain why our returns are below the "
             "paper's: VPG in minibatches of 64 (one epoch, or ten: the paper's Table 4 gives VPG neither; and, since "
             "VPG in minibatches of 64 drives its mean out of the box, storing the raw sample), and PPO with "
             "normalised observations at reward scale 1 and 0.1, and with the rewards normalised too (CleanRL's and "
             "rl-zoo's Hopper settings: observations and rewards normalised)."),
    "long-tanh": dict(
        paper="Table 1 `tanh`, ours", steps=3_000_000, cells=grid(["ppo"], HOPPER, {"mean-transform": ["tanh"]}),
        what="PPO on Hopper-v4 [1024] with the mean tanh-mapped into the box, at 3M steps: does the return still "
             "grow after 1M steps (the paper does not state its budget)?"),
    "logprob-at-shifted": dict(
        paper="ours",
        cells=grid(["ppo", "cpg"], HUMANOID, {"mean-shift": [100.0], "logprob-at": ["clipped", "raw"]}),
        what="PPO and CPG on Humanoid-v4 with the mean shifted out of the box by c = 100 (Appendix A.2), storing "
             "the log-prob of the clipped action (paper) or of the raw sample: with the raw sample the stored "
             "action is never far from the mean, so is the overflow gone?"),
}

# The paper's numbers: experiment -> [(cell values to match, (final return, max return, explosion rate))]
PAPER = {
    "mean-transform": [({"env": e, "mean-transform": t}, (f, None, r)) for e, t, f, r in [
        ("Hopper-v4", "clip", "332 ± 129", "0%"), ("Hopper-v4", "tanh", "234 ± 106", "0%"),
        ("Hopper-v4", "none", "N/A", "100%"),
        ("Walker2d-v4", "clip", "692 ± 346", "0%"), ("Walker2d-v4", "tanh", "434 ± 60", "0%"),
        ("Walker2d-v4", "none", "N/A", "100%"),
        ("Humanoid-v4", "clip", "586 ± 102", "0%"), ("Humanoid-v4", "tanh", "530 ± 72", "0%"),
        ("Humanoid-v4", "none", "N/A", "100%")]],
    "vpg": [({"env": e}, (f, None, "0%")) for e, f in
            [("Hopper-v4", "536 ± 254"), ("Walker2d-v4", "195 ± 135"), ("Humanoid-v4", "355 ± 191")]],
    "reward-scale": [({"reward-scale": s}, (f, m, r)) for s, f, m, r in [
        ("1", "N/A", "1057 ± 593", "100%"), ("0.1", "2792 ± 792", "2897 ± 759", "20%"),
        ("0.01", "2366 ± 931", "3167 ± 421", "40%"), ("0.001", "2303 ± 0", "2269 ± 933", "80%")]],
}


def fmt(v):
    """A flag value as it appears in run ids and on the command line."""
    if isinstance(v, (list, tuple)):
        return "-".join(map(fmt, v))
    return f"{v:g}" if isinstance(v, float) else str(v)


# The scripts' defaults of the flags the grid sets (tested against their Args): a flag at its default is
# left off the command line and the run id, so the same run in several experiments is one run
DEFAULTS = {"policy-hidden": [1024, 1024], "mean-transform": "none", "mean-shift": 0.0, "reward-scale": 1.0,
            "objective": "clip", "learning-rate": 1e-4, "optimizer": "adam", "logprob-at": "clipped",
            "squash": "none", "minibatch-size": 64, "update-epochs": 10, "norm-obs": False, "norm-reward": False}
ALGO_DEFAULTS = {"vpg": {"minibatch-size": None, "update-epochs": 1}}  # VPG: one step on the whole rollout


def effective(algo, flags):
    """The flags that differ from the algorithm's defaults, sorted by name."""
    defaults = {**DEFAULTS, **ALGO_DEFAULTS.get(algo, {})}
    return {k: v for k, v in sorted(flags.items()) if fmt(v) != fmt(defaults[k])}


def cell_id(algo, env, flags):
    return "__".join([algo, env] + [f"{k}={fmt(v)}" for k, v in effective(algo, flags).items()])


def budget(steps):
    """1000000 -> 1M, 200000 -> 200k, 2500 -> 2500: one spelling per number, so ids stay unique."""
    return f"{steps // 10**6}M" if steps % 10**6 == 0 else f"{steps // 1000}k" if steps % 1000 == 0 else str(steps)


def script(algo):
    # REPRODUCE_SCRIPTS_DIR: run other copies of the training scripts (the tests use stubs)
    return os.path.join(os.environ.get("REPRODUCE_SCRIPTS_DIR") or os.path.dirname(os.path.abspath(__file__)),
                        f"{algo}_continuous.py")


def runs_of(exp, seeds, steps, only=()):
    """The experiment's runs, in grid order; `only`: keep runs whose name or id contains every substring.
    name: the run within the experiment (every flag of its cell); id: its folder in the shared store;
    shared: the other experiments that have the same run."""
    homes = {}
    for e, spec in EXPERIMENTS.items():
        for cell in spec["cells"]:
            homes.setdefault(cell_id(*cell), []).append(e)
    runs = []
    for algo, env, flags in EXPERIMENTS[exp]["cells"]:
        group = "__".join([algo, env] + [f"{k}={fmt(v)}" for k, v in flags.items()])
        key = cell_id(algo, env, flags)
        for seed in seeds:
            run = dict(name=f"{group}__s{seed}", id=f"{key}__{budget(steps)}__s{seed}", group=group, algo=algo,
                       env=env, flags=flags, seed=seed, steps=steps, shared=[e for e in homes[key] if e != exp])
            if all(s in run["name"] or s in run["id"] for s in only):
                runs.append(run)
    return runs


def flag_args(key, value):
    if isinstance(value, bool):  # tyro's booleans: --flag / --no-flag
        return [f"--{key}" if value else f"--no-{key}"]
    return [f"--{key}"] + [fmt(v) for v in (value if isinstance(value, list) else [value])]


def command(run, store, cuda=False):
    argv = [sys.executable, script(run["algo"]), "--env-id", run["env"], "--seed", str(run["seed"]),
            "--total-timesteps", str(run["steps"])]
    for k, v in effective(run["algo"], run["flags"]).items():
        argv += flag_args(k, v)
    argv += ["--log-dir", store, "--run-name", run["id"], "--eval-every", str(EVAL_EVERY)] + (["--cuda"] if cuda else [])
    return [fmt(a) for a in argv]


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def outcome(run_dir):
    """(completed | exploded | failed | missing, summary); missing = not started, interrupted or still running."""
    summary = read_json(os.path.join(run_dir, "summary.json")) or {}
    status = summary.get("status")
    if status in DONE:
        return status, summary
    if status == "error" or os.path.exists(os.path.join(run_dir, "reproduce_failed.json")):
        return "failed", summary
    return "missing", summary


# a training script holds this lock (flock, its PID inside) in its run folder while it runs
RUN_LOCK = "run.lock"


def holder(run_dir):
    """The PID of the live process that holds the run folder, None if no process does."""
    try:
        f = open(os.path.join(run_dir, RUN_LOCK))
    except OSError:
        return None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return None  # the lock is free: whoever wrote it is gone
        except OSError:
            return int(f.read().strip() or 0) or None


def unfinished_state(run_dir, summary):
    """What an unfinished run is doing: 'running (pid N)', 'interrupted' (its summary says running or
    interrupted, but no process holds the folder: killed, or cut short) or 'not started'."""
    if not summary:
        return "not started"
    pid = holder(run_dir)
    return f"running (pid {pid})" if pid else "interrupted"


def runs_done(runs, store):
    return sum(outcome(os.path.join(store, r["id"]))[0] in DONE for r in runs)


def num(x, f="{:.1f}"):
    return "—" if x is None else f.format(x)


def seed_list(seeds):
    if len(seeds) > 2 and seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}-{seeds[-1]}"
    return ",".join(map(str, seeds))


def duration(s):
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def die(msg, code=2):
    print(f"reproduce.py: {msg}", file=sys.stderr)
    sys.exit(code)


# ----------------------------------------------------------------------------------------------- run

def popen(cmd, log_path, env, attempt):
    """Start one training run with its stdout and stderr appended to log_path."""
    with open(log_path, "a") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} attempt {attempt}: {shlex.join(cmd)}\n")
        log.flush()
        # its own session: a terminal Ctrl-C reaches only us, and we stop the children in order
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **env}, start_new_session=True)


def interrupt(procs, grace=30.0):
    """SIGTERM makes the scripts save an `interrupted` summary; kill what is still alive after `grace` s.
    (Not SIGINT: under Ray, and under nohup or `&`, children inherit SIGINT ignored.)"""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.time() + grace
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


class StopFlag:
    """Set by the driver on Ctrl-C; the tasks poll it and stop their runs themselves. Not ray.cancel: cancelling
    a task that is just ending crashes the driver inside Ray ("Tried to complete task that was not pending")."""

    def __init__(self):
        self.stopped = False

    def set(self):
        self.stopped = True

    def get(self):
        return self.stopped


def ray_task(cmd, log_path, env, attempt, stop):
    """The body of one Ray task: the same subprocess as the local backend, on whichever node Ray picks."""
    import ray
    proc = popen(cmd, log_path, env, attempt)
    try:
        while proc.poll() is None:
            time.sleep(0.5)
            if ray.get(stop.get.remote()):
                interrupt([proc])
        return proc.returncode
    except BaseException:  # the worker is being shut down: let the script save its summary
        interrupt([proc])
        raise


class Local:
    def __init__(self, workers):
        # split the cores between the runs so parallel runs don't oversubscribe them
        threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // workers))
        self.env = {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": threads}

    def start(self, cmd, log_path, attempt):
        return popen(cmd, log_path, self.env, attempt)

    def wait(self, handles, timeout):
        """[(handle, exit code)] of the runs that ended, waiting up to `timeout` s for one."""
        deadline = time.time() + timeout
        while True:
            ended = [(p, p.poll()) for p in handles if p.poll() is not None]
            if ended or time.time() >= deadline:
                return ended
            time.sleep(0.1)

    def stop(self, handles):
        interrupt(handles)


class Ray:
    def __init__(self, cuda):
        try:
            import ray
        except ImportError:
            die("--backend ray needs Ray: pip install ray (the project's 'cluster' extra)")
        self.ray = ray
        if not ray.is_initialized():
            ray.init(address=os.environ.get("RAY_ADDRESS"))  # an existing cluster, or a local one if unset
            signal.signal(signal.SIGTERM, signal.default_int_handler)  # ray.init's own handler would just exit
        if __name__ != "__main__":  # imported (tests): ship the task by value, workers may not find this module
            ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
        self.task = ray.remote(num_cpus=1, num_gpus=1 if cuda else 0, max_retries=0)(ray_task)
        self.stop_flag = ray.remote(num_cpus=0)(StopFlag).remote()

    def start(self, cmd, log_path, attempt):
        return self.task.remote(cmd, log_path, {"PYTHONUNBUFFERED": "1"}, attempt, self.stop_flag)

    def wait(self, handles, timeout):
        ready, _ = self.ray.wait(handles, num_returns=1, timeout=timeout)
        ended = []
        for ref in ready:
            try:
                ended.append((ref, self.ray.get(ref)))
            except Exception as e:  # the task died (node lost, worker killed): a failed attempt
                ended.append((ref, f"ray: {type(e).__name__}"))
        return ended

    def stop(self, handles):
        self.stop_flag.set.remote()
        if handles:
            self.ray.wait(handles, num_returns=len(handles), timeout=40)


def clear_outputs(run_dir, resume=False):
    """Remove what an earlier attempt left (the log stays, appended), so curves never mix attempts. A resumed
    run keeps its events, summary and checkpoint: the script purges the events logged after the checkpoint."""
    drop = {"reproduce_failed.json"} if resume else {"summary.json", "checkpoint.pt", "postmortem.pt", "error.txt",
                                                     "model.pt", "reproduce_failed.json"}
    for f in os.listdir(run_dir):
        if f in drop or (not resume and f.startswith("events.out.tfevents")):
            os.remove(os.path.join(run_dir, f))


def try_lock(path):
    """An exclusive lock on `path`, held until the returned file is closed; None if another process holds it."""
    f = open(path, "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return f
    except OSError:
        f.close()
        return None


def execute(runs, backend, workers, store, cuda, n_total):
    """Run `runs` `workers` at a time, each continued from its checkpoint if it has one; a run that does not
    end completed/exploded is tried once more from scratch, then reported as failed. A run another process
    holds is skipped. Returns the failed runs; raises KeyboardInterrupt after stopping the children."""
    queue = [(run, 1) for run in runs]
    running, locks, failed = {}, {}, []
    n_done, n_ended, t0 = n_total - len(runs), 0, time.time()
    try:
        while queue or running:
            while queue and len(running) < workers:
                run, attempt = queue.pop(0)
                run_dir = os.path.join(store, run["id"])
                if attempt == 1:
                    os.makedirs(run_dir, exist_ok=True)
                    # the run may also be in an experiment that another `reproduce.py run` is running
                    lock = try_lock(os.path.join(run_dir, ".lock"))
                    if lock is None:
                        print(f"skipped   {run['id']}: running elsewhere (another `reproduce.py run`)", flush=True)
                        continue
                    if outcome(run_dir)[0] in DONE:  # finished elsewhere since we looked
                        lock.close()
                        n_done += 1
                        continue
                    locks[run["id"]] = lock
                resume = attempt == 1 and os.path.exists(os.path.join(run_dir, "checkpoint.pt"))
                clear_outputs(run_dir, resume)
                cmd = [sys.executable, script(run["algo"]), "--resume", run_dir] if resume else \
                    command(run, store, cuda)
                running[backend.start(cmd, os.path.join(run_dir, "train.log"), attempt)] = (run, attempt, time.time())
            for handle, code in backend.wait(list(running), timeout=1.0):
                run, attempt, started = running.pop(handle)
                run_dir = os.path.join(store, run["id"])
                summary = read_json(os.path.join(run_dir, "summary.json")) or {}
                status = summary.get("status")
                if status not in DONE and attempt < 2:
                    print(f"retrying {run['id']} from scratch: exit code {code}, status {status} "
                          f"(log: {run_dir}/train.log)", flush=True)
                    queue.append((run, attempt + 1))
                    continue
                locks.pop(run["id"]).close()
                n_ended += 1
                if status in DONE:
                    n_done += 1
                    result = f"{status:9s}"
                else:
                    failed.append(run)
                    result = "FAILED   "
                    with open(os.path.join(run_dir, "reproduce_failed.json"), "w") as f:
                        json.dump({"attempts": attempt, "exit_code": code, "status": status,
                                   "log": os.path.join(run_dir, "train.log")}, f)
                final = summary.get("final_return")
                elapsed = time.time() - t0
                left = len(queue) + len(running)
                eta = duration(elapsed / n_ended * left) if left else "0s"
                print(f"[{n_done}/{n_total}] {result} {run['id']} in {duration(time.time() - started)}"
                      f" (final return {'N/A' if final is None else f'{final:.1f}'}) | elapsed {duration(elapsed)},"
                      f" ETA {eta}", flush=True)
    except KeyboardInterrupt:
        print(f"\ninterrupted: stopping {len(running)} running runs (they save 'interrupted' summaries and "
              f"checkpoints) ...", file=sys.stderr, flush=True)
        try:
            backend.stop(list(running))
        except KeyboardInterrupt:  # a second Ctrl-C: no more waiting
            if isinstance(backend, Local):
                for p in running:
                    p.kill()
        raise
    finally:
        for lock in locks.values():
            lock.close()
    return failed


def cmd_list(exp, opts):
    seeds, steps = resolve(exp, opts)
    runs = runs_of(exp, seeds, steps, opts.only)
    store = os.path.join(opts.out, "runs")
    print(f"# {exp} ({EXPERIMENTS[exp]['paper']}): {len(runs)} runs, {steps:,} steps, seeds {seed_list(seeds)}, "
          f"{sum(bool(r['shared']) for r in runs)} shared with other experiments, {runs_done(runs, store)} done")
    for r in runs:
        cmd = command(r, store, opts.cuda)
        run_dir = os.path.join(store, r["id"])
        state, summary = outcome(run_dir)
        if state == "missing":
            state = unfinished_state(run_dir, summary)
            state += "; `reproduce.py run` continues it" if state == "interrupted" else ""
        notes = [state] + ([f"also in {', '.join(r['shared'])}"] if r["shared"] else [])
        print(shlex.join(["python", os.path.relpath(cmd[1])] + cmd[2:]) + f"  # {'; '.join(notes)}")


def cmd_run(exp, opts):
    exp_dir = os.path.abspath(os.path.join(opts.out, exp))
    os.makedirs(exp_dir, exist_ok=True)
    lock = try_lock(os.path.join(exp_dir, ".lock")) or die(f"another `reproduce.py run` is using {exp_dir}")
    with lock:
        return run_grid(exp, exp_dir, opts)


def run_grid(exp, exp_dir, opts):
    seeds, steps = resolve(exp, opts)
    runs = runs_of(exp, seeds, steps, opts.only)
    store = os.path.abspath(os.path.join(opts.out, "runs"))
    with open(os.path.join(exp_dir, "grid.json"), "w") as f:
        json.dump({"seeds": seeds, "total_timesteps": steps}, f)
    todo = [r for r in runs if outcome(os.path.join(store, r["id"]))[0] not in DONE]
    workers = opts.workers or (len(todo) if opts.backend == "ray" else 1)  # ray: its resources decide
    print(f"{exp}: {len(runs)} runs ({steps:,} steps, seeds {seed_list(seeds)}), "
          f"{sum(bool(r['shared']) for r in runs)} shared with other experiments, {len(runs) - len(todo)} already "
          f"done, {len(todo)} to run, {workers} at a time ({opts.backend}); runs in {store}", flush=True)
    if not todo:
        return 0
    backend = Ray(opts.cuda) if opts.backend == "ray" else Local(workers)
    try:
        failed = execute(todo, backend, max(1, workers), store, opts.cuda, len(runs))
    except KeyboardInterrupt:
        print(f"{runs_done(runs, store)}/{len(runs)} runs done; run the same command again to resume", file=sys.stderr)
        return 130
    if failed:
        print(f"{len(failed)} runs FAILED twice (see each train.log; the report counts them as failed):")
        for r in failed:
            print(f"  {os.path.join(store, r['id'], 'train.log')}")
        return 1
    n = runs_done(runs, store)
    if n < len(runs):
        print(f"{n}/{len(runs)} runs done; {len(runs) - n} are running elsewhere (another `reproduce.py run`): "
              f"run again once it ends")
        return 0
    print(f"all {len(runs)} runs done; `python reproduce.py report {exp} --out {opts.out}` writes the report")
    return 0


# -------------------------------------------------------------------------------------------- report

def iqm(x):
    """Interquartile mean: the mean of the middle half (scipy.stats.trim_mean(x, 0.25))."""
    x = np.sort(np.asarray(x, dtype=float))
    k = int(0.25 * len(x))
    return float(x[k:len(x) - k].mean())


def iqm_ci(x, n_boot=10_000, seed=0):
    """IQM with a 95% percentile-bootstrap CI over runs (fixed RNG seed, so reports are reproducible)."""
    x = np.asarray(x, dtype=float)
    n, k = len(x), int(0.25 * len(x))
    boot = np.sort(x[np.random.default_rng(seed).integers(0, n, (n_boot, n))], axis=1)[:, k:n - k].mean(axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return iqm(x), float(lo), float(hi)


def binomial_cdf(k, n, p):
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))


def bisect(f, lo=0.0, hi=1.0):
    """The root of f, increasing on [lo, hi], to double precision."""
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) < 0 else (lo, mid)
    return (lo + hi) / 2


def clopper_pearson(k, n, level=0.95):
    """The exact (Clopper-Pearson) interval of a binomial rate k/n: the rates p under which seeing k or more
    (for the lower bound), or k or fewer (the upper), has probability (1 - level) / 2."""
    tail = (1 - level) / 2
    lower = 0.0 if k == 0 else bisect(lambda p: (1 - binomial_cdf(k - 1, n, p)) - tail)
    upper = 1.0 if k == n else bisect(lambda p: tail - binomial_cdf(k, n, p))
    return lower, upper


def fisher_exact(k1, n1, k2, n2):
    """Two-sided p-value of Fisher's exact test of k1 of n1 against k2 of n2: under one rate for both, given
    the margins, the probability of a table no more likely than the one seen (scipy's convention)."""
    hits = k1 + k2

    def probability(x):
        return math.comb(n1, x) * math.comb(n2, hits - x) / math.comb(n1 + n2, hits)

    seen = probability(k1)
    return min(1.0, sum(q for x in range(max(0, hits - n2), min(hits, n1) + 1)
                        if (q := probability(x)) <= seen * (1 + 1e-7)))


def rate_text(k, n):
    """k/n as the reports and the README write it: the count, the rate and its exact 95% interval."""
    lower, upper = clopper_pearson(k, n)
    return f"{k}/{n} = {100 * k / n:.0f}% [{100 * lower:.0f}, {100 * upper:.0f}]"


def group_stats(rows):
    """rows: [(outcome, summary)] of one grid cell -> the numbers of its table row."""
    count = {k: sum(o == k for o, _ in rows) for k in ("completed", "exploded", "failed", "missing")}

    def values(key, outcomes):
        return [s[key] for o, s in rows if o in outcomes and s.get(key) is not None]

    finals, maxes = values("final_return", ["completed"]), values("max_return", DONE)
    evals, max_evals = values("eval_return", ["completed"]), values("max_eval_return", DONE)
    steps, ratios = values("explosion_step", ["exploded"]), values("max_log10_ratio", DONE)
    finished = count["completed"] + count["exploded"]
    return dict(count=count, finals=finals, maxes=maxes, finished=finished,
                final=mean_std(finals), max=mean_std(maxes), eval=mean_std(evals), max_eval=mean_std(max_evals),
                rate=count["exploded"] / finished if finished else None,
                iqm=iqm_ci(finals) if finals else None,
                explosion_step=float(np.median(steps)) if steps else None,
                max_log10_ratio=float(np.median(ratios)) if ratios else None)


def mean_std(x):
    return (float(np.mean(x)), float(np.std(x))) if x else None  # std: population, as the paper's "± 0"


def cell_values(algo, env, flags):
    """A cell as PAPER matches it: algo, env and every flag as text, the default where the cell leaves one off."""
    return {"algo": algo, "env": env,
            **{k: fmt(v) for k, v in {**DEFAULTS, **ALGO_DEFAULTS.get(algo, {}), **flags}.items()}}


def paper_numbers(exp, cell):
    for match, numbers in PAPER.get(exp, []):
        if all(cell.get(k) == v for k, v in match.items()):
            return numbers
    return None


def resolve(exp, opts):
    """Seeds and budget: the options if given, else the experiment's last `run`, else the paper's."""
    last = read_json(os.path.join(opts.out, exp, "grid.json")) or {}
    if opts.seeds:
        if len(opts.seeds) == 1 and opts.seeds[0] < 1:
            die("--seeds N needs N >= 1")
        seeds = list(range(1, opts.seeds[0] + 1)) if len(opts.seeds) == 1 else list(opts.seeds)
    else:
        seeds = last.get("seeds") or list(range(1, SEEDS + 1))
    return seeds, opts.total_timesteps or last.get("total_timesteps") or EXPERIMENTS[exp].get("steps", STEPS)


def report_runs(exp, opts, store):
    """The runs a report covers, with their outcome and summary: with --seeds, those seeds; else the grid's
    seeds and every other seed of a cell that has a finished run in the store (at the budget). Only finished
    runs count: an unfinished one is missing, whatever it has logged so far, so a report depends on the
    finished runs alone and regenerates exactly from them."""
    seeds, steps = resolve(exp, opts)
    stored = set()
    if not opts.seeds and os.path.isdir(store):
        names = set(os.listdir(store))
        for r in runs_of(exp, [0], steps, opts.only):
            prefix = r["id"][:-1]  # ...__s
            stored |= {int(n[len(prefix):]) for n in names if n.startswith(prefix) and n[len(prefix):].isdigit()}
    runs = []
    for r in runs_of(exp, sorted(set(seeds) | stored), steps, opts.only):
        r["outcome"], r["summary"] = outcome(os.path.join(store, r["id"]))
        if r["outcome"] == "missing":
            r["state"] = unfinished_state(os.path.join(store, r["id"]), r["summary"])
            r["summary"] = {}
        if r["seed"] in seeds or r["outcome"] != "missing":
            runs.append(r)
    return runs, steps


DEFINITIONS = (
    "**Definitions.** Final return: mean of a run's last 10 episodes (raw environment return), mean ± std "
    "(population std) over *completed* runs, N/A if none. Max return: best 10-episode moving average of a run, "
    "mean ± std over finished (completed or exploded) runs. Eval return (where runs have it): the deterministic "
    "policy's mean return over 10 episodes of a separate env (the mean action, after its transform or squash, "
    "clipped to the box) at the end of a completed run, mean ± std over completed runs; max eval: a run's best "
    "evaluation (every 100k steps and at the end), over finished runs. A run explodes when a minibatch update "
    "yields a non-finite loss, gradient norm or parameter; explosion rate = exploded runs / finished runs, the "
    "paper's 'fails to complete training', as k/n = rate [exact 95% Clopper-Pearson interval, in %]. The paper's "
    "rate is k of its 5 runs; p: two-sided Fisher exact test of our k/n against it (a small p: the rates differ; "
    "a large one: the data cannot tell them apart, which is not agreement). IQM: interquartile mean of the final "
    "returns of completed runs, 95% percentile-bootstrap CI over runs (10,000 resamples, seed 0). Explosion step: "
    "global step at which a run exploded. Max log10 ratio: largest log10 probability ratio a run's objective used "
    "(after its clipping), median over finished runs that recorded a finite value (a summary holds null once the "
    "ratio overflowed to inf). Runs C/E/F/M: completed / exploded / failed (status error, or failed twice under "
    "reproduce.py) / missing (not started, interrupted or still running).")


def pm(x):
    return "N/A" if x is None else f"{x[0]:.1f} ± {x[1]:.1f}"


def paper_count(rate):
    """The paper's rate as k of its 5 runs ("20%" -> 1), None where it gives none."""
    return round(float(rate.rstrip("%")) / 20) if rate and rate.endswith("%") else None


def table_row(exp, members, varying, has, with_eval):
    r0 = members[0]
    cell = cell_values(r0["algo"], r0["env"], r0["flags"])
    st = group_stats([(r["outcome"], r["summary"]) for r in members])
    paper = paper_numbers(exp, cell) or (None, None, None)
    c = st["count"]
    row = [cell["algo"], cell["env"]] + [cell[k] for k in varying]
    for i, ours in enumerate([pm(st["final"]), pm(st["max"])]):
        row += [ours] + ([paper[i] or "—"] if i in has else [])
    row.append("N/A" if not st["finished"] else rate_text(c["exploded"], st["finished"]))
    if 2 in has:
        k_paper = paper_count(paper[2])
        row.append("—" if k_paper is None else f"{k_paper}/5 = {paper[2]}")
        row.append("—" if k_paper is None or not st["finished"] else
                   f"{fisher_exact(c['exploded'], st['finished'], k_paper, 5):.2g}")
    if with_eval:
        row += [pm(st["eval"]), pm(st["max_eval"])]
    row += ["N/A" if st["iqm"] is None else "{:.1f} [{:.1f}, {:.1f}]".format(*st["iqm"]),
            num(st["explosion_step"], "{:,.0f}"), num(st["max_log10_ratio"], "{:.3g}"),
            f"{c['completed']}/{c['exploded']}/{c['failed']}/{c['missing']}"]
    return "| " + " | ".join(row) + " |"


def results_table(exp, runs):
    spec = EXPERIMENTS[exp]
    groups = {}
    for r in runs:
        groups.setdefault(r["group"], []).append(r)
    # label columns: the flags that vary across the experiment; the others are stated once
    all_flags = [dict(flags) for _, _, flags in spec["cells"]]
    keys = list(dict.fromkeys(k for f in all_flags for k in f))
    varying = [k for k in keys if len({fmt(f.get(k)) for f in all_flags}) > 1]
    fixed = [" ".join(flag_args(k, all_flags[0][k])) for k in keys if k not in varying]
    has = [i for i in range(3) if any(n[i] for _, n in PAPER.get(exp, []))]  # paper columns this table has
    with_eval = any(r["summary"].get("max_eval_return") is not None for r in runs)
    header = ["algo", "env", *varying, "final return"] + (["paper"] if 0 in has else []) + ["max return"] + \
        (["paper"] if 1 in has else []) + ["explosion rate [95% CI]"] + (["paper", "p"] if 2 in has else []) + \
        (["eval return", "max eval return"] if with_eval else []) + \
        ["IQM final [95% CI]", "explosion step (median)", "max log10 ratio (median)", "runs C/E/F/M"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += [table_row(exp, members, varying, has, with_eval) for members in groups.values()]
    return lines, fixed


def runs_table(runs):
    lines = ["| run | also in | status | steps | final return | max return | eval return | explosion step "
             "| max log10 ratio |", "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        s = r["summary"]
        status = {"failed": f"**FAILED** ({s.get('status')}; see train.log)",
                  "missing": f"missing: {r.get('state')}"}.get(r["outcome"], r["outcome"])
        lines.append(f"| {r['id']} | {', '.join(r['shared']) or '—'} | {status} | "
                     f"{num(s.get('global_step'), '{:,}')} | {num(s.get('final_return'))} | {num(s.get('max_return'))} | "
                     f"{num(s.get('eval_return'))} | {num(s.get('explosion_step'), '{:,}')} | "
                     f"{num(s.get('max_log10_ratio'), '{:.3g}')} |")
    return lines


FIGURES = ["learning_curves.png", "stability.png"]


def cmd_report(exp, opts):
    spec = EXPERIMENTS[exp]
    exp_dir = os.path.join(opts.out, exp)
    store = os.path.join(opts.out, "runs")
    runs, steps = report_runs(exp, opts, store)
    seeds = sorted({r["seed"] for r in runs})
    total = {k: sum(r["outcome"] == k for r in runs) for k in ("completed", "exploded", "failed", "missing")}
    table, fixed = results_table(exp, runs)
    lines = [f"# {exp}: {spec['paper']}", "", spec["what"], "",
             f"**Budget**: {steps:,} environment steps per run, seeds {seed_list(seeds)} (each row's count: runs "
             f"C/E/F/M), {len(runs)} runs: {total['completed']} completed, {total['exploded']} exploded, "
             f"{total['failed']} failed, {total['missing']} missing. "
             f"Paper: 5 seeds, step budget not stated (our default: {STEPS:,}). "
             f"Other hyperparameters: the scripts' defaults (paper Tables 3, 4)"
             f"{'; ' + ', '.join(fixed) if fixed else ''}.", "",
             f"Generated {time.strftime('%Y-%m-%d %H:%M')} from the runs in `{store}`.", "",
             *table, "", DEFINITIONS, ""]
    os.makedirs(exp_dir, exist_ok=True)
    why = "not drawn (--no-figures)"
    if not opts.no_figures:
        _, why = plot(runs, exp_dir, store, spec.get("tags", STABILITY), spec.get("figure"))
    # the figures in the folder: those just drawn, or with --no-figures those drawn before
    own = [spec["figure"]["file"]] if "figure" in spec else []
    figures = [f for f in FIGURES + own if os.path.exists(os.path.join(exp_dir, f))]
    lines += ["## Figures", ""]
    # the reason goes to the terminal only, so that the report is the same whatever the reason
    lines += [f"![{f}]({f})" for f in figures] if figures else ["No figures yet (they need matplotlib and runs' logs)."]
    lines += ["", "## Runs", "", *runs_table(runs)]
    path = os.path.join(exp_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines[: lines.index("## Figures")]))
    print(f"wrote {path}" + (f" and {', '.join(figures)}" if figures else f" (figures skipped: {why})"))
    return 0


# -------------------------------------------------------------------------------------------- tables

# The paper's tables with the three environments side by side: title, the experiment whose paper numbers apply,
# environments, rows as (label, algo, flags[, steps]). Cells use the paper's per-env widths unless a row sets them.
TABLES = [
    dict(title="Table 1: PPO with the mean mapped into the box", exp="mean-transform", envs=ENVS,
         rows=[(f"`{t}`", "ppo", {"mean-transform": t}) for t in ("clip", "tanh", "none")]),
    dict(title="Table 2: VPG", exp="vpg", envs=ENVS, rows=[("VPG", "vpg", {})]),
    dict(title="Table 6: PPO with the rewards scaled", exp="reward-scale", envs=HOPPER,
         rows=[(f"× {s:g}", "ppo", {"reward-scale": s}) for s in (1.0, 0.1, 0.01, 0.001)]),
    dict(title="Fig. 4: `[64, 64]` policies", exp="small-nets", envs=ENVS,
         rows=[(a.upper(), a, {"policy-hidden": [64, 64]}) for a in ("ppo", "cpg")]),
    dict(title="Fig. 5: CPG and PPO with the paper's large policies", exp="large-nets", envs=ENVS,
         rows=[(a.upper(), a, {}) for a in ("ppo", "cpg")]),
    dict(title="Ours: what the ratio's log-prob is taken of", exp="logprob-at", envs=ENVS,
         rows=[(f"{a.upper()}, {what}", a, flags) for a in ("ppo", "cpg")
               for what, flags in (("clipped action (paper)", {}), ("raw sample", {"logprob-at": "raw"}),
                                   ("tanh-squashed Gaussian", {"squash": "tanh"}))]),
    dict(title="Ours: settings the paper does not state (the returns gap)", exp="returns-gap", envs=HOPPER,
         detail=True, rows=[
             ("VPG, whole rollout, 1 epoch (default)", "vpg", {}),
             ("VPG, minibatches of 64, 1 epoch", "vpg", {"minibatch-size": 64}),
             ("VPG, minibatches of 64, 10 epochs", "vpg", {"minibatch-size": 64, "update-epochs": 10}),
             ("VPG, minibatches of 64, raw sample stored", "vpg", {"minibatch-size": 64, "logprob-at": "raw"}),
             ("PPO, rewards × 1 (default)", "ppo", {}),
             ("PPO, rewards × 1, observations normalised", "ppo", {"norm-obs": True}),
             ("PPO, rewards × 0.1", "ppo", {"reward-scale": 0.1}),
             ("PPO, rewards × 0.1, observations normalised", "ppo", {"norm-obs": True, "reward-scale": 0.1}),
             ("PPO, observations and rewards normalised", "ppo", {"norm-obs": True, "norm-reward": True}),
             ("PPO, mean tanh-mapped, 1M steps", "ppo", {"mean-transform": "tanh"}),
             ("PPO, mean tanh-mapped, 3M steps", "ppo", {"mean-transform": "tanh"}, 3_000_000)]),
]


def stored_runs(store, algo, env, flags, steps=STEPS):
    """(outcome, summary) of every finished run of a cell in the store, any seed."""
    prefix = f"{cell_id(algo, env, flags)}__{budget(steps)}__s"
    names = sorted(n for n in (os.listdir(store) if os.path.isdir(store) else [])
                   if n.startswith(prefix) and n[len(prefix):].isdigit())
    return [o for o in (outcome(os.path.join(store, n)) for n in names) if o[0] in DONE]


def round_pm(x):
    return "N/A" if x is None else f"{x[0]:.0f} ± {x[1]:.0f}"


def table_cells(exp, algo, env, flags, steps, store, has, detail):
    """One environment's cells of a paper-table row (see paper_table)."""
    full = {"policy-hidden": WIDE[env], **flags}
    paper = paper_numbers(exp, cell_values(algo, env, full)) or (None, None, None)
    runs = stored_runs(store, algo, env, full, steps)
    st = group_stats(runs)
    k_paper = paper_count(paper[2])
    rate = "not run" if not runs else rate_text(st["count"]["exploded"], st["finished"])
    if runs and k_paper is not None:
        rate += f" ({k_paper}/5, p = {fisher_exact(st['count']['exploded'], st['finished'], k_paper, 5):.2g})"
    with_eval = sum(s.get("max_eval_return") is not None for _, s in runs)
    cells = [rate, round_pm(st["final"]) + (f" ({paper[0]})" if paper[0] else "")]
    cells += [round_pm(st["max"]) + (f" ({paper[1]})" if paper[1] else "")] if has[1] or detail else []
    cells += [round_pm(st["eval"])] if detail else []
    return cells + [f"{round_pm(st['max_eval'])} ({with_eval})" if with_eval else "—"]


def paper_table(title, exp, rows, envs, store, detail=False):
    """One paper table: per environment, our explosions against the paper's (Fisher's p), the final return
    (the paper's in brackets), the max return where the paper gives one, and the best deterministic evaluation
    (how many runs have it: the older runs were made before it existed). detail: the max return and the last
    evaluation of completed runs too. A row is (label, algo, flags) or (label, algo, flags, steps)."""
    has = [any(n[i] for _, n in PAPER.get(exp, [])) for i in range(3)]  # final, max, rate: what the paper gives
    header = ["setting"]
    for env in envs:
        header += [f"{env}: explosions" + (" (paper, p)" if has[2] else ""), f"{env}: final" + (" (paper)" * has[0])]
        header += [f"{env}: max" + (" (paper)" * has[1])] if has[1] or detail else []
        header += [f"{env}: eval (end)"] if detail else []
        header += [f"{env}: max eval (runs)"]
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, algo, flags, *steps in rows:
        row = [label] + [c for env in envs
                         for c in table_cells(exp, algo, env, flags, steps[0] if steps else STEPS, store, has, detail)]
        lines.append("| " + " | ".join(row) + " |")
    return lines


TABLES_INTRO = (
    "The paper's tables, the three environments side by side, from every finished run in the store (all seeds; 1M "
    "steps unless a row says otherwise). Explosions: k/n = rate [exact 95% Clopper-Pearson interval, in %], then the "
    "paper's k of 5 and the two-sided Fisher exact p of ours against it. Final: mean ± std of the completed runs' "
    "last-10-episode returns, N/A if none completed; max: the best 10-episode average, over finished runs; eval "
    "(end): the last deterministic evaluation of completed runs; max eval: a run's best deterministic evaluation "
    "(the mean action, 10 episodes, every 100k steps), over the finished runs that have one (their number in "
    "brackets). The paper's numbers are in brackets. Written by `python reproduce.py tables`; the experiments' "
    "reports have the details.")


def cmd_tables(opts):
    store = os.path.join(opts.out, "runs")
    lines = ["# The paper's tables across environments", "", TABLES_INTRO, ""]
    for spec in TABLES:
        lines += paper_table(**spec, store=store) + [""]
    path = os.path.join(opts.out, "tables.md")
    os.makedirs(opts.out, exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {path}")
    return 0


# ------------------------------------------------------------------------------------------- figures

def scalars(run_dir, tags):
    """{tag: (steps, values)} from the run's TensorBoard event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    # a resumed run's events start by purging what it logged after its checkpoint: intended, not worth a warning
    logging.getLogger("tensorboard").setLevel(logging.ERROR)
    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})  # 0: keep every point
    acc.Reload()
    have = set(acc.Tags().get("scalars", []))
    return {t: (np.array([e.step for e in acc.Scalars(t)], dtype=float), np.array([e.value for e in acc.Scalars(t)]))
            for t in tags if t in have}


def moving_average(v, w=10):
    """Mean of the last w values at each point (fewer at the start): the max_return smoothing."""
    c = np.cumsum(np.insert(np.asarray(v, dtype=float), 0, 0.0))
    i = np.arange(1, len(v) + 1)
    lo = np.maximum(i - w, 0)
    return (c[i] - c[lo]) / (i - lo)


def on_grid(series, n=200):
    """Interpolate runs of different lengths onto one step grid: NaN where a run has no data (it ended or
    exploded earlier), so the mean and spread at a step are over the runs still going."""
    end = max(s[-1] for s, _ in series)
    xs = np.linspace(0, end, n)
    ys = np.array([np.where((xs >= s[0]) & (xs <= s[-1]), np.interp(xs, s, v), np.nan) for s, v in series])
    return xs, ys


def plot(runs, exp_dir, store, tags, figure=None):
    """learning_curves.png (mean and min-max over seeds per group), stability.png (each run, log-x so the
    early explosions show; x marks where a run exploded) and the experiment's own `figure` (plot_panels).
    Returns (files, why none)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "matplotlib is not installed (pip install matplotlib, the 'plot' extra)"
    try:
        figure_tags = (figure["tags"] + ([figure["x"]] if figure["x"] != "steps" else [])) if figure else []
        wanted = list(dict.fromkeys(["charts/episodic_return"] + tags + figure_tags))
        data = {r["id"]: scalars(os.path.join(store, r["id"]), wanted)
                for r in runs if os.path.isdir(os.path.join(store, r["id"]))}
    except ImportError:
        return [], "tensorboard is not installed"
    if not any(data.values()):
        return [], "no TensorBoard logs yet"
    envs = list(dict.fromkeys(r["env"] for r in runs if data.get(r["id"])))  # panels with data only
    # a line's label: its algo and the flags that vary between the lines of one panel (one env)
    keys = {k for e in envs for k in dict.fromkeys(k for r in runs for k in r["flags"])
            if len({fmt(r["flags"].get(k)) for r in runs if r["env"] == e}) > 1}
    label = {r["group"]: " ".join([r["algo"]] + [f"{k}={fmt(v)}" for k, v in r["flags"].items() if k in keys])
             for r in runs}
    colors = {lab: plt.cm.tab10(i % 10) for i, lab in enumerate(dict.fromkeys(label.values()))}
    files = ["learning_curves.png", "stability.png"]
    plot_learning_curves(plt, runs, data, envs, label, colors, exp_dir)
    plot_stability(plt, runs, data, envs, tags, label, colors, exp_dir)
    if figure and plot_panels(plt, runs, data, label, exp_dir, **figure):
        files.append(figure["file"])
    return files, ""


def plot_learning_curves(plt, runs, data, envs, label, colors, exp_dir):
    """learning_curves.png: a panel per env, a line per group, the mean over its seeds with their min-max."""
    fig, axes = plt.subplots(1, len(envs), figsize=(6 * len(envs), 4), squeeze=False)
    for ax, env in zip(axes[0], envs):
        for group in dict.fromkeys(r["group"] for r in runs if r["env"] == env):
            series = [(d[0], moving_average(d[1])) for r in runs if r["group"] == group
                      for d in [data.get(r["id"], {}).get("charts/episodic_return")] if d is not None and len(d[0])]
            if not series:
                continue
            xs, ys = on_grid(series)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns past every run's end
                mean, lo, hi = np.nanmean(ys, 0), np.nanmin(ys, 0), np.nanmax(ys, 0)
            col = colors[label[group]]
            ax.plot(xs, mean, color=col, label=f"{label[group]} (n={len(series)})")
            ax.fill_between(xs, lo, hi, color=col, alpha=0.2)
        ax.set(title=env, xlabel="environment steps", ylabel="episodic return (10-episode mean)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(exp_dir, "learning_curves.png"), dpi=100)
    plt.close(fig)


def plot_stability(plt, runs, data, envs, tags, label, colors, exp_dir):
    """stability.png: a row per tag, a column per env, a line per run on log-x; x marks an explosion."""
    fig, axes = plt.subplots(len(tags), len(envs), figsize=(6 * len(envs), 3 * len(tags)), squeeze=False)
    for j, env in enumerate(envs):
        seen = set()
        for r in runs:
            if r["env"] != env:
                continue
            for i, tag in enumerate(tags):
                d = data.get(r["id"], {}).get(tag)
                if d is None or not len(d[0]):
                    continue
                col, lab = colors[label[r["group"]]], label[r["group"]]
                axes[i, j].plot(d[0], d[1], color=col, lw=0.8, alpha=0.8, marker="." if len(d[0]) < 5 else None,
                                label=None if lab in seen else lab)
                seen.add(lab)
                ok = np.isfinite(d[1])
                if r["outcome"] == "exploded" and ok.any():
                    axes[i, j].plot(d[0][ok][-1], d[1][ok][-1], "x", color=col, ms=8)
        for i, tag in enumerate(tags):
            axes[i, j].set(title=f"{env}: {tag.split('/')[-1]}", xscale="log", xlabel="environment steps")
            if tag.endswith(("mean_abs_advantage", "policy_l2_from_init")):
                axes[i, j].set_yscale("log")
        if axes[0, j].get_legend_handles_labels()[0]:
            axes[0, j].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(exp_dir, "stability.png"), dpi=100)
    plt.close(fig)


def plot_panels(plt, runs, data, label, exp_dir, file, tags, x, by=None, only=""):
    """The paper's per-run figures (Figs. 2, 3, 6, 7b,c): a row per tag, a column per value of the flag `by`
    (per env without one), on linear axes as the paper draws them: a line per run against environment steps
    (x="steps"), or a point per update against another tag (x=that tag). Runs are coloured by cell where a panel
    has several, else by seed. Runs whose id lacks `only` are left out. False if no run has data for it."""
    chosen = [r for r in runs if only in r["id"] and any(t in data.get(r["id"], {}) for t in tags)]
    if not chosen:
        return False

    def column(r):
        return r["env"] + (f", {by}={fmt(r['flags'][by])}" if by else "")

    columns = list(dict.fromkeys(column(r) for r in chosen))
    fig, axes = plt.subplots(len(tags), len(columns), figsize=(5 * len(columns), 3 * len(tags)), squeeze=False)
    for j, col in enumerate(columns):
        members = [r for r in chosen if column(r) == col]
        groups = list(dict.fromkeys(r["group"] for r in members))
        seen = set()
        for r in members:
            name = label[r["group"]] if len(groups) > 1 else f"seed {r['seed']}"
            color = plt.cm.tab10((groups.index(r["group"]) if len(groups) > 1 else r["seed"] - 1) % 10)
            for i, tag in enumerate(tags):
                d = data[r["id"]].get(tag)
                if d is None or not len(d[0]):
                    continue
                xs, ys = d if x == "steps" else paired(data[r["id"]].get(x), d)
                cell = groups.index(r["group"])
                # hollow markers, of a shape and size per cell, so that cells landing on one point all show
                style = (dict(lw=0.8, marker="." if len(xs) < 5 else None) if x == "steps" else
                         dict(ls="", marker="osD^v"[cell % 5], ms=12 - 3 * (cell % 3), fillstyle="none"))
                axes[i, j].plot(xs, ys, color=color, label=None if name in seen else name, **style)
                seen.add(name)
                ok = np.isfinite(xs) & np.isfinite(ys)
                if r["outcome"] == "exploded" and ok.any():
                    axes[i, j].plot(xs[ok][-1], ys[ok][-1], "x", color=color, ms=8)
        for i, tag in enumerate(tags):
            axes[i, j].set(title=f"{col}: {tag.split('/')[-1]}",
                           xlabel="environment steps" if x == "steps" else x.split("/")[-1])
        if axes[0, j].get_legend_handles_labels()[0]:
            axes[0, j].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(exp_dir, file), dpi=100)
    plt.close(fig)
    return True


def paired(xd, yd):
    """Two scalars' (steps, values) as (x values, y values) at the steps both have."""
    if xd is None:
        return np.array([]), np.array([])
    _, ix, iy = np.intersect1d(xd[0], yd[0], return_indices=True)
    return xd[1][ix], yd[1][iy]


# ---------------------------------------------------------------------------------------------- main

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["list", "run", "report", "tables"],
                   help="tables: {out}/tables.md, the paper's tables across environments (no experiment)")
    p.add_argument("experiment", nargs="?", help=f"one of: {', '.join(EXPERIMENTS)}; or `all` (list, report)")
    p.add_argument("--seeds", type=int, nargs="+", help="N: seeds 1..N (default 5); several: those seeds")
    p.add_argument("--total-timesteps", type=int, help=f"steps per run (default {STEPS:,}, the paper's)")
    p.add_argument("--workers", type=int, help="runs at a time (local default 1; ray default: all, Ray schedules)")
    p.add_argument("--out", default="results", help="results folder (default results/)")
    p.add_argument("--backend", choices=["local", "ray"], default="local",
                   help="ray: one task per run on the cluster at $RAY_ADDRESS (local Ray if unset)")
    p.add_argument("--cuda", action="store_true", help="pass --cuda to the runs (ray: one GPU per run)")
    p.add_argument("--only", nargs="+", default=[], metavar="TEXT",
                   help="only the runs whose name contains every TEXT, e.g. --only Hopper-v4 mean-transform=clip")
    p.add_argument("--no-figures", action="store_true",
                   help="report: leave the figures as they are (the report links those in its folder)")
    opts = p.parse_args(argv)
    if opts.command == "tables":
        return cmd_tables(opts)
    if opts.experiment is None:
        die(f"{opts.command} needs an experiment (one of: {', '.join(EXPERIMENTS)})")
    if opts.experiment == "all" and opts.command != "run":
        exps = list(EXPERIMENTS)
        if opts.command == "report":  # the experiments that have results
            exps = [e for e in exps if os.path.isdir(os.path.join(opts.out, e))] or die(f"no results in {opts.out}")
    elif opts.experiment in EXPERIMENTS:
        exps = [opts.experiment]
    else:
        die(f"unknown experiment {opts.experiment!r} (choose from {', '.join(EXPERIMENTS)}"
            f"{'' if opts.command == 'run' else ', all'})")
    if opts.workers is not None and opts.workers < 1:
        die("--workers must be >= 1")
    if opts.total_timesteps is not None and opts.total_timesteps < 1:
        die("--total-timesteps must be >= 1")
    if opts.command == "run":
        previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # kill <pid>: stop runs like Ctrl-C
        try:
            return cmd_run(exps[0], opts)
        finally:
            signal.signal(signal.SIGTERM, previous)
    for exp in exps:
        (cmd_report if opts.command == "report" else cmd_list)(exp, opts)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # `list ... | head` stopped reading: quietly, and no second error at exit's flush
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
