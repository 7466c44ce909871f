"""The scripts rearranged algorithm-first, with train() callable from Python (issue 18), give the results they
gave before, bit for bit on CPU: each script runs beside its version from PRE_REFACTOR (from git) with the same
seed, and parameters, summaries, every TensorBoard scalar and postmortems agree; a checkpoint written before
resumes after as if never cut."""
import numpy as np
import pytest

from tests.helpers import (ROOT, SHIFTED_HUMANOID, TINY, assert_equal_tensors, interrupt, load, run_script,
                           scalars_of, scripts_at, summary_of)

# the last commit before the rearrangement
PRE_REFACTOR = "98c846d518bcdb10bb5f5f5665d67e632ab44354"
SMALL = ["--env-id", "Hopper-v4", "--policy-hidden", "64", "64", "--total-timesteps", 2000, "--save-model"]
EVAL = ["--eval-every", 1000, "--eval-episodes", 2]
TIMING = {"wall_time_s", "cpu_time_s", "startup_s", "startup_cpu_s", "sps"}


@pytest.fixture(scope="module")
def pre_refactor(tmp_path_factory):
    return scripts_at(PRE_REFACTOR, tmp_path_factory.mktemp("pre_refactor"))


def without_run_name(args):
    return {key: value for key, value in args.items() if key != "run_name"}


def assert_same_record(before, after):
    """The two run folders' summaries (but timing and run name) and TensorBoard scalars (but SPS) agree."""
    summaries = [summary_of(run_dir) for run_dir in (before, after)]
    for summary in summaries:
        summary["args"] = without_run_name(summary["args"])
    assert {k: v for k, v in summaries[1].items() if k not in TIMING} == \
        {k: v for k, v in summaries[0].items() if k not in TIMING}
    scalars = [scalars_of(run_dir, steps=True) for run_dir in (before, after)]
    for run_scalars in scalars:
        del run_scalars["charts/SPS"]
    assert scalars[1].keys() == scalars[0].keys()
    np.testing.assert_equal(scalars[1], scalars[0])  # NaN equals NaN (explained variance of a flat return)
    return summaries[0]


def run_both(script, flags, old_folder, tmp_path):
    for name, folder in [("before", old_folder), ("after", ROOT)]:
        result = run_script(script, *flags, "--log-dir", tmp_path, "--run-name", name, script_dir=folder)
        assert result.returncode in (0, 3), result.stderr
    return assert_same_record(tmp_path / "before", tmp_path / "after")


@pytest.mark.parametrize("script,flags", [
    ("ppo_continuous.py", [*SMALL, *EVAL, "--anneal-lr", "--norm-adv", "--target-kl", 0.002,
                           "--mean-transform", "tanh"]),
    ("cpg_continuous.py", [*SMALL, *EVAL, "--norm-obs", "--norm-reward"]),
    ("vpg_continuous.py", [*SMALL, "--optimizer", "sgd", "--squash", "tanh"]),
], ids=["ppo-anneal-target-kl-tanh-mean-eval", "cpg-norm-obs-reward-eval", "vpg-sgd-squash"])
def test_parameters_summary_and_scalars_are_those_of_before(script, flags, pre_refactor, tmp_path):
    summary = run_both(script, flags, pre_refactor, tmp_path)
    assert summary["status"] == "completed" and summary["episodes"] > 0
    assert ("eval_return" in summary) == ("--eval-every" in flags)
    assert_equal_tensors(load(tmp_path / "before" / "model.pt")["agent"], load(tmp_path / "after" / "model.pt")["agent"])


def test_explosion_postmortem_is_that_of_before(pre_refactor, tmp_path):
    summary = run_both("ppo_continuous.py", [*SHIFTED_HUMANOID, "--total-timesteps", 2000], pre_refactor, tmp_path)
    assert summary["status"] == "exploded"
    before, after = load(tmp_path / "before" / "postmortem.pt"), load(tmp_path / "after" / "postmortem.pt")
    assert before.keys() == after.keys()
    for key in ["reason", "global_step", "iteration", "epoch", "obs_dim"]:
        assert before[key] == after[key], key
    for key in ["minibatch", "agent", "stats"]:
        assert_equal_tensors(before[key], after[key])
    assert_equal_tensors({key: before[key] for key in ["loss", "grad_norm", "action_low", "action_high"]},
                         {key: after[key] for key in ["loss", "grad_norm", "action_low", "action_high"]})
    assert before["optimizer"]["param_groups"] == after["optimizer"]["param_groups"]
    for index, state in before["optimizer"]["state"].items():
        assert_equal_tensors(state, after["optimizer"]["state"][index])
    assert without_run_name(before["args"]) == without_run_name(after["args"])
    del before["telemetry"]["charts/SPS"], after["telemetry"]["charts/SPS"]
    np.testing.assert_equal(after["telemetry"], before["telemetry"])


def test_a_checkpoint_from_before_resumes_as_an_uncut_run_of_before(pre_refactor, tmp_path):
    flags = ["--env-id", "Hopper-v4", *TINY, "--num-envs", 2, "--num-steps", 32, "--minibatch-size", 32,
             "--total-timesteps", 384, "--norm-obs", "--norm-reward", "--save-model"]
    whole = run_script("cpg_continuous.py", *flags, "--log-dir", tmp_path, "--run-name", "whole", script_dir=pre_refactor)
    assert whole.returncode == 0, whole.stderr
    cut = interrupt("cpg_continuous.py", *flags, "--log-dir", tmp_path, "--run-name", "cut", after=2,
                    script_dir=pre_refactor)
    assert cut.returncode == 130, cut.stderr
    resumed = run_script("cpg_continuous.py", "--resume", tmp_path / "cut")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_record(tmp_path / "whole", tmp_path / "cut")
    assert_equal_tensors(load(tmp_path / "whole" / "model.pt")["agent"], load(tmp_path / "cut" / "model.pt")["agent"])
