"""The faults a long run meets (issue 20): a full disk at each write, injected and real; SIGKILL at five points,
checkpoint writes among them; a second writer in a live run's folder, and a dead run's lock."""
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from tensorboard.compat.tensorflow_stub.io import gfile

import reproduce
from tests.helpers import ROOT, SCRIPTS, load_script, scalars_of, summary_of

FAULT_RUNNER = ROOT / "tests" / "data" / "fault_runner.py"
# six iterations of 64 steps (test_checkpoint.py's run)
HOPPER = ["--env-id", "Hopper-v4", "--value-hidden", 8, "--num-envs", 2, "--num-steps", 32, "--minibatch-size", 32,
          "--total-timesteps", 384]
ENOSPC = "no space left on device"


def test_the_machinery_is_the_same_in_the_three_scripts():
    # so that the tests below that run a process for each fault (seconds each) need to run one script only
    machinery = {script: (ROOT / script).read_text().split("\n# The machinery:")[1] for script in SCRIPTS}
    assert len(set(machinery.values())) == 1


# --- a full disk at each write, injected into train() ---------------------------------------------------------


def counter_args(module, run_dir, **args):
    """Three iterations of 32 steps on tests.envs' Counter, into run_dir."""
    return module.Args(**{"env_id": "tests.envs:Counter-v0", "policy_hidden": (8,), "value_hidden": (8,),
                          "num_steps": 32, "minibatch_size": 16, "total_timesteps": 96, "log_dir": str(run_dir.parent),
                          "run_name": run_dir.name, **args})


def disk_full_at(monkeypatch, name, after, times):
    """The writes of the run's file `name` (its temporary file, or TensorBoard's events) fail as on a full disk,
    `times` of them after `after` good ones: the temporary file half written, an event not at all."""
    calls = []

    def fails(path):
        if os.path.basename(os.fsdecode(path)).startswith(name):
            calls.append(path)
            return after < len(calls) <= after + times
        return False

    def no_space():
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def half_written(write, path_of):
        def write_or_fail(*args, **kwargs):
            write(*args, **kwargs)
            path = path_of(args)
            if fails(path):
                os.truncate(path, os.path.getsize(path) // 2)
                raise no_space()
        return write_or_fail

    def append_or_fail(fs, filename, *args):
        if fails(filename):
            raise no_space()
        append(fs, filename, *args)

    append = gfile.LocalFileSystem.append
    monkeypatch.setattr(torch, "save", half_written(torch.save, lambda args: args[1].name))  # an open file
    monkeypatch.setattr(Path, "write_text", half_written(Path.write_text, lambda args: args[0]))
    monkeypatch.setattr(gfile.LocalFileSystem, "append", append_or_fail)


# (the file, good writes of it first, failed ones, train's args, global step of the checkpoint left; None: none)
SITES = {
    "later-checkpoint": ("checkpoint.pt", 1, 1, {}, 0),
    "first-checkpoint": ("checkpoint.pt", 0, 1, {}, None),
    "summary": ("summary.json", 1, 2, {}, 0),  # and the first try of the error summary: the second one stays
    "events": ("events.out.tfevents", 3, 1, {}, 0),
    "postmortem": ("postmortem.pt", 0, 1, {"optimizer": "sgd", "learning_rate": 1e300}, 0),
    "model": ("model.pt", 0, 1, {"save_model": True}, 64),
}


@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize("script", SCRIPTS)
def test_a_full_disk_at_each_write_ends_in_one_line_with_the_last_checkpoint_kept(script, site, tmp_path,
                                                                                  monkeypatch, capsys):
    name, after, times, args, saved_step = SITES[site]
    module, run_dir = load_script(script), tmp_path / "run"
    monkeypatch.setattr(module, "CHECKPOINT_INTERVAL_S", 0)  # a checkpoint at every iteration boundary
    disk_full_at(monkeypatch, name, after, times)
    unhandled = []
    monkeypatch.setattr(threading, "excepthook", unhandled.append)
    summary = module.train(counter_args(module, run_dir, **args))
    assert threading.excepthook == unhandled.append and not unhandled  # TensorBoard's thread kept quiet, and is
    what = f"{run_dir}/{name}" if name != "events.out.tfevents" else f"the TensorBoard events in {run_dir}"
    resume = f"--resume {run_dir} continues from global step {saved_step}" if saved_step is not None else \
        "no checkpoint was saved: start the run again"
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == f"error: {ENOSPC} writing {what}; {resume} once there is space"
    assert "Traceback" not in err
    assert json.loads(json.dumps(summary)) == summary_of(run_dir) and summary["status"] == "error"
    assert summary["error"] == f"WriteFailed: {ENOSPC} writing {what}"
    assert not list(run_dir.glob("*.tmp")) and reproduce.holder(run_dir) is None
    if saved_step is None:
        assert not (run_dir / "checkpoint.pt").exists()
        return
    assert torch.load(run_dir / "checkpoint.pt", weights_only=False)["global_step"] == saved_step
    monkeypatch.undo()  # space again
    assert module.train(module.Args(resume=str(run_dir)))["status"] == ("exploded" if site == "postmortem" else
                                                                        "completed")


def test_an_error_whose_traceback_cannot_be_saved_still_ends_in_one_line(tmp_path, monkeypatch, capsys):
    module, run_dir = load_script("ppo_continuous.py"), tmp_path / "run"
    disk_full_at(monkeypatch, "error.txt", 0, 1)
    summary = module.train(counter_args(module, run_dir, env_id="tests.envs:NonFiniteReward-v0"))
    assert summary["status"] == "error" and "non-finite observation or reward" in summary["error"]
    line = capsys.readouterr().err.splitlines()[-1]
    assert line.startswith("error: ") and "non-finite observation or reward" in line
    assert line.endswith(f" (no traceback saved: {ENOSPC} writing {run_dir}/error.txt)")
    assert not list(run_dir.glob("error.txt*"))


def test_an_interrupt_whose_checkpoint_cannot_be_written_keeps_the_one_before(tmp_path, monkeypatch, capsys):
    module, run_dir = load_script("cpg_continuous.py"), tmp_path / "run"
    collect_rollout = module.collect_rollout

    def rollout_cut_short(*args):
        if args[6] == 32:  # the second: its boundary's checkpoint is not written (only a minute after the first)
            signal.raise_signal(signal.SIGTERM)
        return collect_rollout(*args)

    monkeypatch.setattr(module, "collect_rollout", rollout_cut_short)
    disk_full_at(monkeypatch, "checkpoint.pt", 1, 1)
    summary = module.train(counter_args(module, run_dir))
    assert summary["status"] == "error" and summary["global_step"] == 32
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: {ENOSPC} writing {run_dir}/checkpoint.pt; --resume {run_dir} continues from global step 0 "
        "once there is space")
    assert torch.load(run_dir / "checkpoint.pt", weights_only=False)["global_step"] == 0


def test_a_checkpoint_is_written_after_the_events_it_counts(tmp_path, monkeypatch):
    # TensorBoard's thread writes them, a hundredth of a second each here: without waiting for it, a kill just
    # after a checkpoint would lose events that its resume does not log again
    module, run_dir = load_script("vpg_continuous.py"), tmp_path / "run"
    monkeypatch.setattr(module, "CHECKPOINT_INTERVAL_S", 0)
    append, write_atomically, logged = gfile.LocalFileSystem.append, module.write_atomically, []

    def slow_append(*args):
        time.sleep(0.01)
        append(*args)

    def write_after_looking(path, write, durable=False):
        if path.endswith("checkpoint.pt"):
            logged.append(scalars_of(run_dir, steps=True).get("stability/nonfinite_updates", []))
        write_atomically(path, write, durable)

    monkeypatch.setattr(gfile.LocalFileSystem, "append", slow_append)
    monkeypatch.setattr(module, "write_atomically", write_after_looking)
    assert module.train(counter_args(module, run_dir))["status"] == "completed"
    assert logged == [[], [(32, 0.0)], [(32, 0.0), (64, 0.0)]]


# --- one writer per run folder --------------------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_run_holds_its_folder_and_takes_over_a_dead_ones_lock(script, tmp_path, monkeypatch):
    module, run_dir = load_script(script), tmp_path / "run"
    run_dir.mkdir()
    (run_dir / reproduce.RUN_LOCK).write_text("999999")  # left by a process that is gone: nobody holds it
    seen, collect_rollout = [], module.collect_rollout

    def rollout_beside_a_second_writer(*args):
        if not seen:  # a second run into the folder, and a --resume of this one, are refused naming this process
            seen.append(reproduce.holder(run_dir))
            for second in [counter_args(module, run_dir), module.Args(resume=str(run_dir))]:
                with pytest.raises(module.BadArgument, match=f"^{re.escape(str(run_dir))} is in use by a live run "
                                                             rf"\(pid {os.getpid()}\)"):
                    module.train(second)
        return collect_rollout(*args)

    monkeypatch.setattr(module, "collect_rollout", rollout_beside_a_second_writer)
    assert module.train(counter_args(module, run_dir))["status"] == "completed"
    assert seen == [os.getpid()] and reproduce.holder(run_dir) is None


# --- SIGKILL, and a real full disk: the script in a process of its own -----------------------------------------


def start(script, *args, fault=None):
    """The script under tests/data/fault_runner.py: a checkpoint at every boundary, and `fault`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **({"FAULT": fault} if fault else {})}
    return subprocess.Popen([sys.executable, FAULT_RUNNER, ROOT / script, *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def kill_when_paused(process):
    for line in process.stdout:
        if line.startswith("paused at "):
            process.kill()  # SIGKILL, to this process only
            process.communicate()
            return
    raise AssertionError(f"it ended, exit code {process.wait()}, instead of pausing")


def finished(process):
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 0, output


# (fault, the iteration checkpoint.pt starts after the kill): each run resumes the one killed before it
KILLS = [
    ("checkpoint.pt:3:partial", 2),  # half of iteration 3's checkpoint written
    ("summary.json:3:partial", 3),  # resumed at 2: half of the summary after iteration 3
    ("checkpoint.pt:2:written", 3),  # resumed at 3: iteration 4's checkpoint complete, not yet renamed
    ("rollout:3", 5),  # resumed at 3: as iteration 5's rollout starts
    ("model.pt:1:partial", 6),  # resumed at 5: half of the model, after the last iteration
]


def test_sigkill_at_five_points_resumes_from_the_last_intact_checkpoint_as_if_never_cut(tmp_path):
    script, args = "ppo_continuous.py", [*HOPPER, "--policy-hidden", 8, "--save-model", "--log-dir", tmp_path]
    whole, cut = start(script, *args, "--run-name", "whole"), tmp_path / "cut"  # beside the others: two cores
    command = [*args, "--run-name", "cut"]
    for fault, iteration in KILLS:
        kill_when_paused(start(script, *command, fault=fault))
        assert torch.load(cut / "checkpoint.pt", weights_only=False)["iteration"] == iteration, fault
        name = fault.split(":")[0]
        assert name == "rollout" or (cut / f"{name}.tmp").exists(), fault  # what the kill cut short stays
        command = ["--resume", cut]
    finished(start(script, *command))
    finished(whole)

    assert not list(cut.glob("*.tmp")) and not (cut / "checkpoint.pt").exists()
    expected, resumed = summary_of(tmp_path / "whole"), summary_of(cut)
    untimed = [key for key in expected if not (key.endswith("_s") or key in ("sps", "args"))]
    assert resumed["status"] == "completed"
    assert {key: resumed[key] for key in untimed} == {key: expected[key] for key in untimed}
    assert {**resumed["args"], "run_name": "cut"} == {**expected["args"], "run_name": "cut"}
    expected = torch.load(tmp_path / "whole" / "model.pt", weights_only=False)["agent"]
    resumed = torch.load(cut / "model.pt", weights_only=False)["agent"]
    assert expected.keys() == resumed.keys() and all(torch.equal(expected[key], resumed[key]) for key in expected)
    expected, resumed = scalars_of(tmp_path / "whole", steps=True), scalars_of(cut, steps=True)
    del expected["charts/SPS"], resumed["charts/SPS"]
    assert resumed == expected


@pytest.fixture
def small_disk(tmp_path):
    """A 6 MB tmpfs, as in the issue, and a function that resizes it. Mounting one takes root."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if not shutil.which("mount"):
        pytest.skip("no mount command here: a real 6 MB filesystem cannot be made")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", disk], capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a 6 MB tmpfs here (it takes root): {mounted.stderr.strip()}")
    try:
        yield disk, lambda size: subprocess.run(["mount", "-o", f"remount,size={size}", disk], check=True)
    finally:
        subprocess.run(["umount", disk], check=True)


def test_a_real_full_disk_keeps_the_last_checkpoint_and_resume_continues_once_there_is_space(small_disk):
    disk, resize = small_disk
    run_dir = disk / "run"
    # a 5 MB checkpoint: the first fits in 6 MB, the second's temporary file beside it does not
    process = start("cpg_continuous.py", *HOPPER, "--policy-hidden", 512, 512, "--log-dir", disk, "--run-name", "run")
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 1, output
    assert output.splitlines()[-1] == (f"error: {ENOSPC} writing {run_dir}/checkpoint.pt; --resume {run_dir} "
                                       "continues from global step 0 once there is space")
    assert "Traceback" not in output
    summary = summary_of(run_dir)
    assert summary["status"] == "error" and summary["error"] == f"WriteFailed: {ENOSPC} writing {run_dir}/checkpoint.pt"
    assert not list(run_dir.glob("*.tmp"))
    assert torch.load(run_dir / "checkpoint.pt", weights_only=False)["global_step"] == 0

    resize("16m")
    finished(start("cpg_continuous.py", "--resume", run_dir))
    assert summary_of(run_dir)["status"] == "completed" and not list(run_dir.glob("*.tmp"))
