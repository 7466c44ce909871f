"""reproduce.py: the grids and run ids, shared runs, locks, resume after a kill, retries, the report's
numbers and figures, the Ray backend, and one tiny real experiment. Training is replaced by
tests/data/stub_runner.py except in the last test."""
import fcntl
import importlib.util
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import reproduce  # noqa: E402
from tests.helpers import default_sigint  # noqa: E402

REPRO = os.path.join(ROOT, "reproduce.py")
STUB = os.path.join(ROOT, "tests", "data", "stub_runner.py")
ALGOS = ("ppo", "cpg", "vpg")
HAVE_SCRIPTS = all(os.path.exists(os.path.join(ROOT, f"{a}_continuous.py")) for a in ALGOS)


@pytest.fixture
def stubs(tmp_path, monkeypatch):
    """The stub runner under the three script names, used by reproduce.py in and out of process."""
    d = tmp_path / "stubs"
    d.mkdir()
    for a in ALGOS:
        shutil.copy(STUB, d / f"{a}_continuous.py")
    monkeypatch.setenv("REPRODUCE_SCRIPTS_DIR", str(d))
    monkeypatch.delenv("STUB_PLAN", raising=False)
    return d


def read(*parts):
    with open(os.path.join(*parts)) as f:
        return f.read()


def run_dir(out, run_id):
    return os.path.join(out, "runs", run_id)


def ids(exp, seeds, steps=reproduce.STEPS, only=()):
    return [r["id"] for r in reproduce.runs_of(exp, seeds, steps, only)]


def argvs(out, run_id):
    """The stub's argv of each call of the run."""
    path = os.path.join(run_dir(out, run_id), "calls.txt")
    return [line.split()[1:] for line in read(path).splitlines()] if os.path.exists(path) else []


def calls(out, run_id):
    return len(argvs(out, run_id))


def event_files(out, run_id):
    return [f for f in os.listdir(run_dir(out, run_id)) if f.startswith("events.out.tfevents")]


def status(out, run_id):
    return (reproduce.read_json(os.path.join(run_dir(out, run_id), "summary.json")) or {}).get("status")


def flags_of(cmd):
    """{flag: [values]} of a command line."""
    out, key = {}, None
    for tok in cmd[2:]:
        if tok.startswith("--"):
            key = tok[2:]
            out[key] = []
        else:
            out[key].append(tok)
    return out


# ------------------------------------------------------------------------------------------------ grid

EXPECTED = {  # experiment: (runs at 5 seeds, algos, envs)
    "mean-transform": (45, {"ppo"}, set(reproduce.ENVS)),
    "vpg": (15, {"vpg"}, set(reproduce.ENVS)),
    "reward-scale": (20, {"ppo"}, {"Hopper-v4"}),
    "constraints": (15, {"ppo"}, {"Humanoid-v4"}),
    "small-nets": (30, {"ppo", "cpg"}, set(reproduce.ENVS)),
    "large-nets": (30, {"ppo", "cpg"}, set(reproduce.ENVS)),
    "learning-rate": (15, {"ppo"}, {"Walker2d-v4"}),
    "optimizer-width": (30, {"ppo"}, {"Hopper-v4"}),
    "shifted-mean": (15, {"ppo", "cpg", "vpg"}, {"Humanoid-v4"}),
    "logprob-at": (60, {"ppo", "cpg"}, set(reproduce.ENVS)),
    "logprob-at-shifted": (20, {"ppo", "cpg"}, {"Humanoid-v4"}),
    "squash": (60, {"ppo", "cpg"}, set(reproduce.ENVS)),
    "returns-gap": (30, {"ppo", "vpg"}, {"Hopper-v4"}),
    "long-tanh": (5, {"ppo"}, {"Hopper-v4"}),
}


def values(exp, flag):
    """The values of `flag` on the experiment's command lines (the default where it is left off)."""
    default = reproduce.flag_args(flag, reproduce.DEFAULTS[flag])[1:]
    return {tuple(flags_of(reproduce.command(r, "out")).get(flag, default)) for r in reproduce.runs_of(exp, [1], 1000)}


def test_grid_contents():
    assert set(reproduce.EXPERIMENTS) == set(EXPECTED)
    for exp, (n, algos, envs) in EXPECTED.items():
        runs = reproduce.runs_of(exp, [1, 2, 3, 4, 5], 1234)
        assert len(runs) == n, exp
        assert len({r["name"] for r in runs}) == len({r["id"] for r in runs}) == n, exp  # unique
        assert {r["algo"] for r in runs} == algos and {r["env"] for r in runs} == envs, exp
        for r in runs:
            cmd = reproduce.command(r, "/o", cuda=True)
            f = flags_of(cmd)
            assert cmd[0] == sys.executable and cmd[1].endswith(f"{r['algo']}_continuous.py")
            assert f["env-id"] == [r["env"]] and f["seed"] == [str(r["seed"])] and f["total-timesteps"] == ["1234"]
            assert f["log-dir"] == ["/o"] and f["run-name"] == [r["id"]] and f["cuda"] == []
            assert r["name"].startswith(f"{r['algo']}__{r['env']}__") and r["name"].endswith(f"__s{r['seed']}")
            if exp not in ("small-nets", "optimizer-width"):  # the paper's per-env widths (Table 3)
                assert f.get("policy-hidden", ["1024", "1024"]) == [str(w) for w in reproduce.WIDE[r["env"]]]
            if "objective" in r["flags"]:
                assert r["algo"] == "ppo"  # PPO-only flag
    assert values("mean-transform", "mean-transform") == {("clip",), ("tanh",), ("none",)}
    assert values("reward-scale", "reward-scale") == {("1",), ("0.1",), ("0.01",), ("0.001",)}
    assert values("constraints", "objective") == {("clip",), ("kl-penalty",), ("none",)}
    assert values("constraints", "mean-shift") == values("shifted-mean", "mean-shift") == {("100",)}
    assert values("small-nets", "policy-hidden") == {("64", "64")}
    assert values("learning-rate", "learning-rate") == {("0.0001",), ("3e-05",), ("1e-05",)}
    assert values("optimizer-width", "optimizer") == {("adam",), ("sgd",)}
    assert values("optimizer-width", "policy-hidden") == {("64",), ("256",), ("1024",)}
    assert values("logprob-at", "logprob-at") == {("clipped",), ("raw",)}
    assert values("squash", "squash") == {("none",), ("tanh",)}
    assert values("squash", "policy-hidden") == values("logprob-at", "policy-hidden") == {("1024",), ("1024", "1024")}
    # Fig. 3 plots a few hundred optimization steps: its cells are 100k-step runs, clip shared with shifted-mean
    assert reproduce.EXPERIMENTS["constraints"]["steps"] == 100_000
    clip = ids("constraints", [1], 100_000, only=["objective=clip"])
    assert clip == ids("shifted-mean", [1], 100_000, only=["ppo"]) == ["ppo__Humanoid-v4__mean-shift=100__100k__s1"]
    assert ids("vpg", [1, 2], 1000, only=["Walker2d", "s2"]) == ["vpg__Walker2d-v4__1k__s2"]


def test_run_ids_name_effective_command_lines():
    """One id per effective command line: the same run in several experiments is one run, with its budget."""
    assert [reproduce.budget(n) for n in (1_000_000, 3_000_000, 200_000, 20_000, 2500, 1)] == \
        ["1M", "3M", "200k", "20k", "2500", "1"]
    lines = {}
    for exp in reproduce.EXPERIMENTS:
        for steps in (2000, 1_000_000):
            for r in reproduce.runs_of(exp, [1, 2], steps):
                cmd = reproduce.command(r, "/o")
                lines.setdefault(r["id"], set()).add(tuple(cmd[:cmd.index("--run-name")]))
    assert all(len(cmds) == 1 for cmds in lines.values())  # one command line per id
    assert len({c for cmds in lines.values() for c in cmds}) == len(lines)  # and one id per command line
    hopper = "ppo__Hopper-v4__policy-hidden=1024__1M__s1"  # the default PPO Hopper [1024] run
    homes = {exp: r for exp in reproduce.EXPERIMENTS for r in reproduce.runs_of(exp, [1], reproduce.STEPS)
             if r["id"] == hopper}
    assert set(homes) == {"mean-transform", "reward-scale", "large-nets", "optimizer-width", "logprob-at", "squash"}
    assert [homes[e]["flags"][k] for e, k in [("mean-transform", "mean-transform"), ("reward-scale", "reward-scale"),
                                               ("logprob-at", "logprob-at"), ("squash", "squash")]] == \
        ["none", 1.0, "clipped", "none"]
    assert homes["squash"]["shared"] == ["mean-transform", "reward-scale", "large-nets", "optimizer-width",
                                         "logprob-at"]
    assert ids("squash", [2], 20_000, only=["Hopper"]) == ["ppo__Hopper-v4__policy-hidden=1024__20k__s2",
                                          "ppo__Hopper-v4__policy-hidden=1024__squash=tanh__20k__s2",
                                          "cpg__Hopper-v4__policy-hidden=1024__20k__s2",
                                          "cpg__Hopper-v4__policy-hidden=1024__squash=tanh__20k__s2"]
    assert ids("squash", [2], 20_000, only=["ppo__Walker2d"]) == ["ppo__Walker2d-v4__20k__s2",
                                                                   "ppo__Walker2d-v4__squash=tanh__20k__s2"]
    assert ids("shifted-mean", [1], 2500)[0] == ids("constraints", [1], 2500)[0] == \
        "ppo__Humanoid-v4__mean-shift=100__2500__s1"


def load_args(algo):
    spec = importlib.util.spec_from_file_location(f"_{algo}_script", os.path.join(ROOT, f"{algo}_continuous.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not __main__: defines Args, trains nothing
    return module.Args


@pytest.mark.skipif(not HAVE_SCRIPTS, reason="training scripts not present")
def test_commands_parse_with_the_scripts_own_args():
    """DEFAULTS are the scripts' defaults, and every distinct command shape parses with the real scripts'
    tyro Args into the intended values."""
    import tyro
    args_of = {a: load_args(a) for a in ALGOS}
    for a, Args in args_of.items():
        for k, v in {**reproduce.DEFAULTS, **reproduce.ALGO_DEFAULTS.get(a, {})}.items():
            if a == "ppo" or k != "objective":  # --objective is PPO's alone
                assert reproduce.fmt(getattr(Args(), k.replace("-", "_"))) == reproduce.fmt(v), (a, k)
    for exp in reproduce.EXPERIMENTS:
        for r in reproduce.runs_of(exp, [3], 5000):
            cmd = reproduce.command(r, "/tmp/x", cuda=False)
            assert cmd[1] == os.path.join(ROOT, f"{r['algo']}_continuous.py")
            args = tyro.cli(args_of[r["algo"]], args=cmd[2:])
            assert (args.env_id, args.seed, args.total_timesteps) == (r["env"], 3, 5000)
            assert (args.log_dir, args.run_name) == ("/tmp/x", r["id"])
            for k, v in r["flags"].items():
                got = getattr(args, k.replace("-", "_"))
                assert (list(got) if k == "policy-hidden" else got) == v, (exp, k)


def test_list_cli_and_bad_names(tmp_path, capsys):
    out = subprocess.run([sys.executable, REPRO, "list", "reward-scale", "--seeds", "2", "--out", str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0
    lines = out.stdout.splitlines()
    assert lines[0] == "# reward-scale (Table 6): 8 runs, 1,000,000 steps, seeds 1,2, 2 shared with other " \
                       "experiments, 0 done"
    cmds = [shlex.split(line, comments=True) for line in lines[1:]]
    assert len(cmds) == 8 and all(c[:2] == ["python", "ppo_continuous.py"] for c in cmds)
    assert flags_of(cmds[2])["reward-scale"] == ["0.1"] and flags_of(cmds[2])["seed"] == ["1"]
    assert "reward-scale" not in flags_of(cmds[0])  # 1 is the default
    listed = subprocess.run([sys.executable, REPRO, "list", "all", "--out", str(tmp_path)],
                            capture_output=True, text=True, cwd=ROOT)
    assert sum(line.startswith("python ") for line in listed.stdout.splitlines()) == sum(
        n for n, _, _ in EXPECTED.values())
    for argv in (["list", "nope"], ["report", "nope"], ["run", "all"]):
        bad = subprocess.run([sys.executable, REPRO, *argv, "--out", str(tmp_path)], capture_output=True, text=True,
                             cwd=ROOT)
        assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, argv
        assert "unknown experiment" in bad.stderr

    reproduce.main(["list", "squash", "--seeds", "1", "--only", "Hopper", "--out", str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("4 runs, 1,000,000 steps, seeds 1, 2 shared with other experiments, 0 done")
    assert [line.partition("  # ")[2] for line in lines[1:]] == [
        "not started; also in mean-transform, reward-scale, large-nets, optimizer-width, logprob-at", "not started",
        "not started; also in large-nets, logprob-at", "not started"]


def test_list_into_a_reader_that_stops(tmp_path):
    """`list all | head -1`: its ~95 kB outgrow the pipe's 64 kB, so the writes after `head` left fail."""
    listing = subprocess.Popen([sys.executable, REPRO, "list", "all", "--out", str(tmp_path)], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert listing.stdout.readline().startswith("# ")
    listing.stdout.close()
    assert listing.wait(timeout=60) == 1
    assert listing.stderr.read() == ""


# ----------------------------------------------------------------------------------------------- run

@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_resume_after_kill(stubs, tmp_path, sig):
    """Kill `run` mid-grid: children save 'interrupted' and their checkpoints, finished runs are never rerun,
    the interrupted ones are continued with --resume, keeping their event files."""
    out = str(tmp_path / "out")
    exp = "reward-scale"
    names = ids(exp, [1, 2])
    fast, slow, later = names[:2], names[2:4], names[4:]  # grid order: scale 1, 0.1, 0.01, 0.001
    env = {**os.environ, "STUB_PLAN": json.dumps({"reward-scale=0.1__": "sleep"}), "STUB_SLEEP": "60"}
    cmd = [sys.executable, REPRO, "run", exp, "--seeds", "2", "--workers", "2", "--out", out]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         preexec_fn=default_sigint)
    deadline = time.time() + 30
    while not all(status(out, n) == "running" for n in slow):
        assert time.time() < deadline and p.poll() is None, "the slow runs never started"
        time.sleep(0.1)
    p.send_signal(sig)
    log = p.communicate(timeout=60)[0]
    assert p.returncode == 130, log
    assert "[1/8] completed" in log and "[2/8] completed" in log and "to resume" in log
    assert [status(out, n) for n in fast + slow] == ["completed"] * 2 + ["interrupted"] * 2
    pids = [int(read(run_dir(out, n), "calls.txt").split()[0]) for n in slow]
    for pid in pids:  # the children were stopped, not orphaned
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert all(calls(out, n) == 0 for n in later)

    done = subprocess.run(cmd, env={**env, "STUB_PLAN": "{}"}, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 already done, 6 to run" in done.stdout and "[8/8]" in done.stdout and "ETA" in done.stdout
    assert [calls(out, n) for n in names] == [1, 1, 2, 2, 1, 1, 1, 1]
    assert all(status(out, n) == "completed" for n in names)
    for n in slow:  # continued from the checkpoint, the first attempt's curves kept
        assert argvs(out, n)[1] == ["--resume", run_dir(out, n)] and len(event_files(out, n)) == 2
    log = read(run_dir(out, slow[0]), "train.log")  # both attempts' output, appended
    assert log.count("attempt 1:") == 2 and "stub sleep call 1" in log and "stub complete call 2" in log
    assert "stub stderr line" in log


def test_retry_once_then_failed_and_reported(stubs, tmp_path, monkeypatch, capsys):
    """A failed attempt is retried once from scratch (no event files of the failed attempt left); a later
    `run` continues a failed run from its checkpoint, and a resume that fails is retried from scratch."""
    out = str(tmp_path / "out")
    hop, walk, hum = ids("vpg", [1], 3000)
    monkeypatch.setenv("STUB_PLAN", json.dumps({"Hopper": ["error", "error", "complete"],
                                                "Walker2d": ["error", "complete"],
                                                "Humanoid": ["crash", "crash", "error", "complete"]}))
    assert reproduce.main(["run", "vpg", "--seeds", "1", "--out", out, "--total-timesteps", "3000"]) == 1
    text = capsys.readouterr().out
    assert [calls(out, n) for n in (hop, walk, hum)] == [2, 2, 2]  # each retried exactly once
    assert all("--resume" not in argv for n in (hop, walk, hum) for argv in argvs(out, n))
    assert [len(event_files(out, n)) for n in (hop, walk, hum)] == [1, 1, 1]
    assert text.count("retrying") == 3 and text.count("FAILED") >= 2 and "2 runs FAILED twice" in text
    assert f"FAILED    {hop}" in text and f"FAILED    {hum}" in text and f"completed {walk}" in text
    assert [reproduce.outcome(run_dir(out, n))[0] for n in (hop, walk, hum)] == ["failed", "completed", "failed"]
    marker = json.loads(read(run_dir(out, hum), "reproduce_failed.json"))
    assert marker["attempts"] == 2 and marker["exit_code"] == 1 and marker["status"] == "running"

    reproduce.main(["report", "vpg", "--out", out])  # budget and seeds from the last run
    report = read(out, "vpg", "report.md")
    assert "3,000 environment steps per run, seeds 1 (each row's count: runs C/E/F/M), 3 runs: 1 completed, 0 exploded, 2 failed" \
        in report
    assert report.count("| 0/0/1/0 |") == 2 and "| 1/0/0/0 |" in report and report.count("**FAILED**") == 2

    # a later run continues the failed ones from their checkpoints, never the finished one
    assert reproduce.main(["run", "vpg", "--out", out]) == 0
    assert [calls(out, n) for n in (hop, walk, hum)] == [3, 2, 4]
    assert argvs(out, hop)[2] == ["--resume", run_dir(out, hop)] and len(event_files(out, hop)) == 2
    assert argvs(out, hum)[2] == ["--resume", run_dir(out, hum)]  # failed: retried from scratch
    assert "--resume" not in argvs(out, hum)[3] and len(event_files(out, hum)) == 1
    assert not os.path.exists(os.path.join(run_dir(out, hop), "reproduce_failed.json"))
    assert all(reproduce.outcome(run_dir(out, n))[0] == "completed" for n in (hop, walk, hum))


def test_budgets_never_mix(stubs, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert reproduce.main(["run", "vpg", "--seeds", "1", "--only", "Hopper", "--out", out,
                           "--total-timesteps", "1000"]) == 0
    assert reproduce.main(["run", "vpg", "--seeds", "1", "--out", out, "--total-timesteps", "2000"]) == 0
    assert "0 already done, 3 to run" in capsys.readouterr().out
    assert [calls(out, n) for n in ids("vpg", [1], 1000) + ids("vpg", [1], 2000)] == [1, 0, 0, 1, 1, 1]
    reproduce.main(["report", "vpg", "--out", out, "--total-timesteps", "1000"])
    assert "3 runs: 1 completed, 0 exploded, 0 failed, 2 missing" in read(out, "vpg", "report.md")


def test_shared_runs_are_trained_once(stubs, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert reproduce.main(["run", "reward-scale", "--seeds", "1", "--only", "reward-scale=1__", "--out", out]) == 0
    assert reproduce.main(["run", "squash", "--seeds", "1", "--only", "Hopper", "--out", out]) == 0
    assert "4 runs (1,000,000 steps, seeds 1), 2 shared with other experiments, 1 already done, 3 to run" \
        in capsys.readouterr().out
    assert reproduce.main(["run", "large-nets", "--seeds", "1", "--only", "Hopper", "--out", out]) == 0
    assert "2 already done, 0 to run" in capsys.readouterr().out
    assert [calls(out, n) for n in ids("squash", [1], only=["Hopper"])] == [1, 1, 1, 1]
    assert sorted(os.listdir(out)) == ["large-nets", "reward-scale", "runs", "squash"]
    assert len(os.listdir(os.path.join(out, "runs"))) == 4
    reproduce.main(["report", "large-nets", "--out", out])
    assert "6 runs: 2 completed" in read(out, "large-nets", "report.md")


def hold(path):
    """Lock `path` as another `reproduce.py run` would."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    f = open(path, "w")
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return f


def test_locks(stubs, tmp_path, capsys):
    """A second `run` of an experiment is refused; a run that another `run` holds is skipped, not failed."""
    out = str(tmp_path / "out")
    with hold(os.path.join(out, "vpg", ".lock")):
        with pytest.raises(SystemExit) as e:
            reproduce.main(["run", "vpg", "--seeds", "1", "--out", out])
        assert e.value.code == 2
    hop, walk, hum = ids("vpg", [1])
    assert not os.path.exists(os.path.join(out, "runs"))
    with hold(os.path.join(run_dir(out, walk), ".lock")):
        assert reproduce.main(["run", "vpg", "--seeds", "1", "--out", out]) == 0
    text = capsys.readouterr().out
    assert f"skipped   {walk}: running elsewhere" in text and "2/3 runs done; 1 are running elsewhere" in text
    assert [calls(out, n) for n in (hop, walk, hum)] == [1, 0, 1]
    assert reproduce.main(["run", "vpg", "--out", out]) == 0
    assert [calls(out, n) for n in (hop, walk, hum)] == [1, 1, 1]


# -------------------------------------------------------------------------------------------- report

def test_iqm_and_bootstrap_ci():
    assert reproduce.iqm([8, 1, 7, 2, 6, 3, 5, 4]) == 4.5  # mean of 3, 4, 5, 6
    assert reproduce.iqm([1, 2, 3, 4, 100]) == 3.0  # middle three
    assert reproduce.iqm([5]) == 5.0
    m, lo, hi = reproduce.iqm_ci([100, 200, 300, 400])
    assert m == 250 and 100 <= lo < 250 < hi <= 400
    assert reproduce.iqm_ci([100, 200, 300, 400]) == (m, lo, hi)  # fixed RNG seed: reproducible
    assert reproduce.iqm_ci([7, 7, 7]) == (7.0, 7.0, 7.0)


def test_on_grid_handles_runs_of_different_lengths():
    xs, ys = reproduce.on_grid([(np.array([0.0, 100.0]), np.array([0.0, 10.0])),
                                (np.array([0.0, 40.0]), np.array([5.0, 5.0]))], n=11)
    assert xs[-1] == 100 and np.allclose(ys[0], np.arange(11))
    assert np.allclose(ys[1][:5], 5) and np.isnan(ys[1][5:]).all()  # no data after the short run ended
    assert np.allclose(reproduce.moving_average([1, 2, 3, 4], w=2), [1, 1.5, 2.5, 3.5])


def write_summary(out, run_id, **fields):
    d = run_dir(out, run_id)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "summary.json"), "w") as f:
        json.dump({"args": {"total_timesteps": 5000}, "max_log10_ratio": 0.5, **fields}, f)
    return d


def test_report_numbers_and_figures(tmp_path):
    out, exp = str(tmp_path), "reward-scale"
    runs = {(r["flags"]["reward-scale"], r["seed"]): r["id"] for r in reproduce.runs_of(exp, [1, 2, 3, 4, 5], 5000)}
    for s, m in zip(range(1, 6), [1000, 1100, 900, 1200, 800]):  # scale 1: all explode
        write_summary(out, runs[1.0, s], status="exploded", max_return=m, final_return=3.0,
                      explosion_step=1000 * s, max_log10_ratio=38.0)
    for s, f in zip(range(1, 5), [100, 200, 300, 400]):  # scale 0.1: four complete, one explodes
        write_summary(out, runs[0.1, s], status="completed", final_return=f, max_return=f + 10)
    write_summary(out, runs[0.1, 5], status="exploded", final_return=50, max_return=60, explosion_step=7000)
    for s, f in zip(range(1, 4), [10, 20, 60]):  # scale 0.01: three complete, one error, one missing
        write_summary(out, runs[0.01, s], status="completed", final_return=f, max_return=f)
    write_summary(out, runs[0.01, 4], status="error", final_return=1.0, max_return=1.0)

    from torch.utils.tensorboard import SummaryWriter
    for seed, n_steps in ((1, 5), (2, 2)):  # two runs of different lengths
        w = SummaryWriter(run_dir(out, runs[0.1, seed]))
        for i in range(1, n_steps + 1):
            w.add_scalar("charts/episodic_return", 10.0 * i + seed, 1000 * i)
            for tag in reproduce.STABILITY:
                w.add_scalar(tag, 0.1 * i, 1000 * i)
        w.close()
    w = SummaryWriter(run_dir(out, runs[1.0, 1]))  # an exploded run: inf at the end
    w.add_scalar("stability/max_log10_ratio", 2.0, 1000)
    w.add_scalar("stability/max_log10_ratio", float("inf"), 2000)
    w.close()
    got = reproduce.scalars(run_dir(out, runs[0.1, 1]), ["charts/episodic_return", "not/there"])
    assert list(got) == ["charts/episodic_return"]
    assert np.allclose(got["charts/episodic_return"][0], [1000, 2000, 3000, 4000, 5000])
    assert np.allclose(got["charts/episodic_return"][1], [11, 21, 31, 41, 51])

    def rows(scale):
        return [reproduce.outcome(run_dir(out, runs[scale, s])) for s in range(1, 6)]

    st = reproduce.group_stats(rows(0.1))
    assert st["count"] == {"completed": 4, "exploded": 1, "failed": 0, "missing": 0}
    assert np.allclose(st["final"], (250, np.std([100, 200, 300, 400]))) and st["rate"] == 0.2
    assert np.allclose(st["max"], (np.mean([110, 210, 310, 410, 60]), np.std([110, 210, 310, 410, 60])))
    assert st["iqm"] == reproduce.iqm_ci([100, 200, 300, 400]) and st["explosion_step"] == 7000
    st = reproduce.group_stats(rows(1.0))
    assert st["final"] is None and st["rate"] == 1.0
    assert np.allclose(st["max"], (1000, np.std([1000, 1100, 900, 1200, 800])))
    assert st["explosion_step"] == 3000 and st["max_log10_ratio"] == 38.0
    st = reproduce.group_stats(rows(0.01))
    assert st["count"] == {"completed": 3, "exploded": 0, "failed": 1, "missing": 1} and st["rate"] == 0.0
    assert np.allclose(st["final"], (30, np.std([10, 20, 60])))
    assert reproduce.group_stats(rows(0.001))["count"]["missing"] == 5

    assert reproduce.main(["report", exp, "--out", out, "--seeds", "5", "--total-timesteps", "5000"]) == 0
    report = read(out, exp, "report.md")
    assert "5,000 environment steps per run, seeds 1-5 (each row's count: runs C/E/F/M), 20 runs: 7 completed, " \
        "6 exploded, 1 failed, 6 missing" in report

    def line(scale):
        return next(x for x in report.splitlines() if f"| ppo | Hopper-v4 | {scale} |" in x)

    # rates as k/n = % [Clopper-Pearson 95%], the paper's as k of 5, and Fisher's p of the two
    assert line("1") == ("| ppo | Hopper-v4 | 1 | N/A | N/A | 1000.0 ± 141.4 | 1057 ± 593 | 5/5 = 100% [48, 100] "
                         "| 5/5 = 100% | 1 | N/A | 3,000 | 38 | 0/5/0/0 |")
    assert line("0.1").startswith("| ppo | Hopper-v4 | 0.1 | 250.0 ± 111.8 | 2792 ± 792 | 220.0 ± 128.1 | 2897 ± 759 "
                                  "| 1/5 = 20% [1, 72] | 1/5 = 20% | 1 | 250.0 [")
    # 0 of 3 against 2 of 5: tables with 0 or 2 of the 2 explosions in ours are as likely or less, 10/28 + 3/28
    assert line("0.01").endswith("| 3/0/1/1 |") and "30.0 ± 21.6" in line("0.01") and \
        "| 0/3 = 0% [0, 71] | 2/5 = 40% | 0.46 |" in line("0.01")
    assert line("0.001").startswith("| ppo | Hopper-v4 | 0.001 | N/A | 2303 ± 0 | N/A | 2269 ± 933 | N/A "
                                    "| 4/5 = 80% | — |")
    assert "eval return" not in report.split("**Definitions.**")[0]  # no run has an evaluation
    assert "explosion rate = exploded runs / finished runs" in report and "fails to complete training" in report
    if importlib.util.find_spec("matplotlib"):
        for f in ("learning_curves.png", "stability.png"):
            assert f"![{f}]({f})" in report
            with open(os.path.join(out, exp, f), "rb") as fh:
                assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    else:
        assert "No figures yet (they need matplotlib and runs' logs)." in report


def png_size(path):
    """(width, height) in pixels, from the PNG's header."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def test_a_tag_plotted_against_another_pairs_them_by_step():
    """Fig. 3 plots one scalar against another: a point per step both were logged at, in step order."""
    ratio = (np.array([1000.0, 2000.0, 3000.0]), np.array([0.1, 5.0, 40.0]))
    kl = (np.array([2000.0, 3000.0, 4000.0]), np.array([-1.5, -1.2, -0.9]))
    xs, ys = reproduce.paired(ratio, kl)
    assert xs.tolist() == [5.0, 40.0] and ys.tolist() == [-1.5, -1.2]
    assert [len(v) for v in reproduce.paired(None, kl)] == [0, 0]


@pytest.mark.skipif(not importlib.util.find_spec("matplotlib"), reason="matplotlib is not installed")
def test_the_papers_per_run_figures(tmp_path):
    """Fig. 3 (constraints): one panel, log10 KL against the max log10 ratio, every objective in it; Figs. 2, 6
    (large-nets): PPO on Humanoid only, a row each for the ratio, the min std and the KL. Panels are 5 x 3 inches at 100
    dpi, so the image's size counts them; an experiment without its runs' logs draws none."""
    from torch.utils.tensorboard import SummaryWriter

    out = str(tmp_path)
    for exp, only in (("constraints", ()), ("large-nets", ("Humanoid",))):
        for r in reproduce.runs_of(exp, [1, 2], 100_000 if exp == "constraints" else reproduce.STEPS, only):
            write_summary(out, r["id"], status="exploded" if r["algo"] == "ppo" else "completed")
            w = SummaryWriter(run_dir(out, r["id"]))
            for i in range(1, 4):
                for tag in reproduce.STABILITY:
                    w.add_scalar(tag, float(i * r["seed"]), 2048 * i)
            w.close()
    assert reproduce.main(["report", "constraints", "--out", out, "--seeds", "2"]) == 0
    assert png_size(os.path.join(out, "constraints", "kl_and_ratio.png")) == (500, 300)
    assert "![kl_and_ratio.png](kl_and_ratio.png)" in read(out, "constraints", "report.md")
    assert reproduce.main(["report", "large-nets", "--out", out, "--seeds", "2"]) == 0
    assert png_size(os.path.join(out, "large-nets", "humanoid_ppo_ratio_and_std.png")) == (500, 900)
    assert reproduce.main(["report", "optimizer-width", "--out", out, "--seeds", "2"]) == 0
    assert not os.path.exists(os.path.join(out, "optimizer-width", "l2_from_init.png"))
    assert "![l2_from_init.png]" not in read(out, "optimizer-width", "report.md")


def test_exact_interval_and_fisher_test():
    # k = 0 and k = n have closed forms: the bound where the other tail alone is 2.5%
    for n in (3, 5, 10):
        assert reproduce.clopper_pearson(0, n) == (0.0, pytest.approx(1 - 0.025 ** (1 / n), rel=1e-12))
        assert reproduce.clopper_pearson(n, n) == (pytest.approx(0.025 ** (1 / n), rel=1e-12), 1.0)
    lower, upper = reproduce.clopper_pearson(3, 10)  # each bound leaves 2.5% in its tail
    assert sum(math.comb(10, i) * lower**i * (1 - lower) ** (10 - i) for i in range(3, 11)) == pytest.approx(0.025)
    assert sum(math.comb(10, i) * upper**i * (1 - upper) ** (10 - i) for i in range(4)) == pytest.approx(0.025)
    # 0 of 5 against 5 of 5: only this table and its mirror are as extreme, each 1 / C(10, 5)
    assert reproduce.fisher_exact(0, 5, 5, 5) == pytest.approx(2 / 252)
    assert reproduce.fisher_exact(5, 5, 5, 5) == 1.0 and reproduce.fisher_exact(3, 10, 3, 10) == 1.0
    assert reproduce.rate_text(8, 9) == "8/9 = 89% [52, 100]"
    stats = pytest.importorskip("scipy.stats")
    for k1, n1, k2, n2 in [(8, 9, 1, 5), (3, 10, 2, 5), (10, 10, 4, 5), (1, 7, 0, 5), (6, 13, 5, 5)]:
        assert reproduce.fisher_exact(k1, n1, k2, n2) == pytest.approx(
            stats.fisher_exact([[k1, n1 - k1], [k2, n2 - k2]]).pvalue, rel=1e-9)
        ci = stats.binomtest(k1, n1).proportion_ci(method="exact")
        assert reproduce.clopper_pearson(k1, n1) == (pytest.approx(ci.low, abs=1e-9), pytest.approx(ci.high, abs=1e-9))


def test_report_covers_every_finished_seed_and_the_evaluation(tmp_path):
    out, exp = str(tmp_path), "large-nets"
    runs = {(r["algo"], r["env"], r["seed"]): r["id"] for r in reproduce.runs_of(exp, range(1, 8), 5000)}
    os.makedirs(os.path.join(out, exp))
    with open(os.path.join(out, exp, "grid.json"), "w") as f:
        json.dump({"seeds": [1, 2], "total_timesteps": 5000}, f)
    for seed in (1, 2, 7):  # seed 7 beyond the grid's
        write_summary(out, runs["cpg", "Hopper-v4", seed], status="completed", final_return=10.0 * seed,
                      max_return=20.0, eval_return=100.0 * seed, max_eval_return=150.0 * seed)
    write_summary(out, runs["cpg", "Hopper-v4", 5], status="running", final_return=1.0, global_step=123)
    write_summary(out, runs["ppo", "Hopper-v4", 6], status="interrupted", final_return=1.0, global_step=456)
    assert reproduce.main(["report", exp, "--out", out, "--no-figures"]) == 0
    report = read(out, exp, "report.md")
    # the grid's seeds 1-2 and the finished seed 7; seeds 5 and 6 have not finished: not in the report
    assert "seeds 1,2,7 (each row's count" in report
    row = next(x for x in report.splitlines() if x.startswith("| cpg | Hopper-v4 |"))
    assert "| 0/3 = 0% [0, 71] | 333.3 ± 262.5 | 500.0 ± 393.7 |" in row and row.endswith("| 3/0/0/0 |")
    assert "| ppo | Hopper-v4 | 1024 | N/A | N/A | N/A | N/A | N/A |" in report  # its grid seeds: missing
    assert "__s5 |" not in report and "__s6 |" not in report and "123" not in report and "456" not in report
    assert "No figures yet (they need matplotlib and runs' logs)." in report
    assert reproduce.main(["report", exp, "--out", out, "--no-figures", "--seeds", "2"]) == 0  # seeds 1-2 only
    report = read(out, exp, "report.md")
    assert "seeds 1,2 (each row's count" in report and "__s7 |" not in report
    row = next(x for x in report.splitlines() if x.startswith("| cpg | Hopper-v4 |"))
    assert "| 0/2 = 0% [0, 84] | 150.0 ± 50.0 |" in row and row.endswith("| 2/0/0/0 |")


def test_unfinished_runs_say_whether_a_process_holds_them(tmp_path, capsys):
    out = str(tmp_path)
    running, killed, fresh = ids("vpg", [1], 5000)
    write_summary(out, running, status="running", global_step=2000)
    write_summary(out, killed, status="running", global_step=3000)  # its process was killed: no holder
    with open(os.path.join(run_dir(out, killed), reproduce.RUN_LOCK), "w") as f:
        f.write("999999")  # a dead process's lock, not held
    lock = open(os.path.join(run_dir(out, running), reproduce.RUN_LOCK), "w")
    lock.write(str(os.getpid()))
    lock.flush()
    fcntl.flock(lock, fcntl.LOCK_EX)  # as a live training script holds it
    try:
        assert reproduce.holder(run_dir(out, running)) == os.getpid()
        assert reproduce.holder(run_dir(out, killed)) is None and reproduce.holder(run_dir(out, fresh)) is None
        assert reproduce.main(["list", "vpg", "--seeds", "1", "--out", out, "--total-timesteps", "5000"]) == 0
        listed = capsys.readouterr().out.splitlines()[1:]
        assert listed[0].endswith(f"# running (pid {os.getpid()})")
        assert listed[1].endswith("# interrupted; `reproduce.py run` continues it")
        assert listed[2].endswith("# not started")
        assert reproduce.main(["report", "vpg", "--seeds", "1", "--out", out, "--total-timesteps", "5000",
                               "--no-figures"]) == 0
        report = read(out, "vpg", "report.md")
        assert f"| {running} | — | missing: running (pid {os.getpid()}) | — |" in report
        assert f"| {killed} | — | missing: interrupted | — |" in report
        assert f"| {fresh} | — | missing: not started | — |" in report
    finally:
        lock.close()


def committed_runs():
    """The run folders whose summary.json git tracks (a clean clone has no others)."""
    listed = subprocess.run(["git", "ls-files", "results"], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode:
        pytest.skip(f"not a git checkout: {listed.stderr.strip()}")
    return {os.path.dirname(p) for p in listed.stdout.splitlines() if p.endswith("/summary.json")}


def committed_store(out, tmp_path):
    """A store of links to the committed runs under `out` alone: what a fresh clone has."""
    os.makedirs(tmp_path / "runs")
    for run in committed_runs():
        if os.path.dirname(run) == os.path.join(out, "runs"):
            os.symlink(os.path.join(ROOT, run), tmp_path / "runs" / os.path.basename(run))


@pytest.mark.parametrize("out", ["results", "results/200k"])
def test_committed_reports_regenerate_exactly(out, tmp_path):
    """`report EXP` alone, on the committed runs, writes each committed report again; only the line that
    says when and from where may differ."""
    committed_store(out, tmp_path)
    reports = [e for e in reproduce.EXPERIMENTS if os.path.exists(os.path.join(ROOT, out, e, "report.md"))]
    assert reports
    for exp in reports:
        shutil.copytree(os.path.join(ROOT, out, exp), tmp_path / exp)  # its grid.json and figures
        assert reproduce.main(["report", exp, "--out", str(tmp_path), "--no-figures"]) == 0
        committed, regenerated = (read(d, exp, "report.md").splitlines() for d in (os.path.join(ROOT, out), tmp_path))
        assert len(committed) == len(regenerated), exp
        for old, new in zip(committed, regenerated):
            if not old.startswith("Generated "):
                assert new == old, exp


def test_committed_tables_regenerate_exactly_and_are_the_readmes(tmp_path, capsys):
    """`tables` on the committed runs writes results/tables.md again, and the README (docs/results.md for the
    returns gap) shows each of its tables as written, under its title: the numbers there are the runs'."""
    committed_store("results", tmp_path)
    assert reproduce.main(["tables", "--out", str(tmp_path)]) == 0
    written = read(tmp_path, "tables.md")
    assert written == read(ROOT, "results", "tables.md")
    shown = read(ROOT, "README.md") + read(ROOT, "docs", "results.md")
    for spec in reproduce.TABLES:
        table = written.split(f"### {spec['title']}\n\n")[1].split("\n\n")[0]
        assert table.startswith("| setting |") and f"**{spec['title']}**\n\n{table}\n" in shown, spec["title"]
    assert reproduce.main(["tables", "--out", str(tmp_path / "empty")]) == 0  # no runs: every cell "not run"
    assert "| `clip` | not run | N/A (332 ± 129) | — | not run |" in read(tmp_path, "empty", "tables.md")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        reproduce.main(["report", "--out", str(tmp_path)])
    assert e.value.code == 2 and "report needs an experiment" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- ray

def test_ray_backend(stubs, tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    out = str(tmp_path / "out")
    monkeypatch.setenv("STUB_PLAN", json.dumps({"Walker2d": ["error", "complete"], "Humanoid": "explode"}))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # workers inherit STUB_PLAN
    try:
        assert reproduce.main(["run", "vpg", "--seeds", "2", "--backend", "ray", "--out", out]) == 0
        names = ids("vpg", [1, 2])
        assert [calls(out, n) for n in names] == [1, 1, 2, 2, 1, 1]  # Walker2d retried once
        assert [status(out, n) for n in names] == ["completed"] * 4 + ["exploded"] * 2
        assert reproduce.main(["run", "vpg", "--backend", "ray", "--out", out]) == 0  # resume: nothing to do
        assert [calls(out, n) for n in names] == [1, 1, 2, 2, 1, 1]
    finally:
        ray.shutdown()


def test_ray_backend_interrupted(stubs, tmp_path):
    """Ctrl-C on `run --backend ray` (its own local Ray: RAY_ADDRESS unset) stops the tasks, whose children
    save 'interrupted' summaries, while other tasks are ending (Ray's own ray.cancel crashed there)."""
    pytest.importorskip("ray")
    out = str(tmp_path / "out")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(STUB_PLAN=json.dumps({"Hopper": "sleep"}), STUB_SLEEP="120")
    p = subprocess.Popen([sys.executable, REPRO, "run", "vpg", "--seeds", "1", "--backend", "ray", "--out", out],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         preexec_fn=default_sigint)
    hop = ids("vpg", [1])[0]
    deadline = time.time() + 60
    while status(out, hop) != "running":
        assert time.time() < deadline and p.poll() is None, "the Ray task never started"
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    log = p.communicate(timeout=60)[0]
    assert p.returncode == 130, log
    assert status(out, hop) == "interrupted" and "to resume" in log


# ------------------------------------------------------------------------------- real, end to end

@pytest.mark.skipif(not HAVE_SCRIPTS, reason="training scripts not present")
def test_end_to_end_shifted_mean(tmp_path):
    """The real scripts, 2 iterations each: PPO with the mean shifted out of the box explodes (the ratio
    overflows), CPG and VPG complete; the report and figures come from their real logs."""
    out = str(tmp_path)
    cmd = [sys.executable, REPRO, "run", "shifted-mean", "--seeds", "1", "--total-timesteps", "2000",
           "--workers", "2", "--out", out]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    ppo, cpg, vpg = ids("shifted-mean", [1], 2000)
    assert [status(out, n) for n in (ppo, cpg, vpg)] == ["exploded", "completed", "completed"]
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "3 already done, 0 to run" in again.stdout
    rep = subprocess.run([sys.executable, REPRO, "report", "shifted-mean", "--out", out],
                         capture_output=True, text=True, timeout=120)
    assert rep.returncode == 0, rep.stderr
    report = read(out, "shifted-mean", "report.md")
    assert "2,000 environment steps per run" in report and "| 0/1/0/0 |" in report
    assert report.count("| 1/0/0/0 |") == 2
    if importlib.util.find_spec("matplotlib"):
        assert os.path.getsize(os.path.join(out, "shifted-mean", "stability.png")) > 10_000


@pytest.mark.skipif(not HAVE_SCRIPTS, reason="training scripts not present")
def test_a_live_script_holds_its_folder_until_killed_and_run_resumes_it(tmp_path, capsys):
    """A real script's run.lock: `list` says running (pid) while it runs, and a second writer and a --resume of it
    are refused in one line naming that pid; once it is SIGKILLed `list` says interrupted, and `run` resumes it:
    reproduce.py's lock and the script's, in one folder, do not wait on each other."""
    from tests.helpers import cli_in_process

    out = str(tmp_path)
    run = reproduce.runs_of("vpg", [1], 2000)[0]
    cmd, folder = reproduce.command(run, os.path.join(out, "runs")), run_dir(out, run["id"])

    def listed():
        assert reproduce.main(["list", "vpg", "--seeds", "1", "--total-timesteps", "2000", "--out", out]) == 0
        return capsys.readouterr().out.splitlines()[1]

    # stopped as its second rollout starts, its first checkpoint written
    live = subprocess.Popen([cmd[0], os.path.join(ROOT, "tests", "data", "fault_runner.py"), *cmd[1:]],
                            env={**os.environ, "FAULT": "rollout:2", "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, text=True)
    try:
        assert any(line.startswith("paused at") for line in live.stdout)
        assert listed().endswith(f"# running (pid {live.pid})")
        for args in [cmd[2:], ["--resume", folder]]:
            code, stderr = cli_in_process("vpg_continuous.py", *args)
            assert code == 2 and stderr.strip() == (f"error: {folder} is in use by a live run (pid {live.pid}): "
                                                    "one process at a time writes a run folder")
    finally:
        live.kill()
        live.communicate()
    assert listed().endswith("# interrupted; `reproduce.py run` continues it")
    done = subprocess.run([sys.executable, REPRO, "run", "vpg", "--seeds", "1", "--total-timesteps", "2000",
                           "--only", run["id"], "--out", out], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert status(out, run["id"]) == "completed" and f"--resume {folder}" in read(folder, "train.log")
