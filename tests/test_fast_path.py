"""The update that never waits for the device per minibatch (the --cuda fast path).

Every step's finiteness stays on the device (fused Adam/SGD skip a non-finite step through found_inf) and is
read once per epoch; an epoch with a non-finite step is rolled back and redone eagerly up to that step.
On CPU this must change nothing: each script runs beside its own version from before the change
(PRE_FAST_PATH, from git), same seed, and parameters, postmortems and summaries agree bit for bit.
On CUDA (skipped without a GPU): the CUDA-graph path against plain eager CUDA, and the explosion contract.
"""
import subprocess
import sys

import pytest
import torch

from tests.helpers import (ROOT, SCRIPTS, SHIFTED_HUMANOID, assert_equal_tensors, load, load_script, run_script,
                           scripts_at, summary_of)

# the last commit whose scripts read every minibatch's loss and gradient norm on the host
PRE_FAST_PATH = "ebe6f92"
# a [64, 64] policy keeps the runs short; 1000 steps in minibatches of 64 leave a last one of 40
SMALL = ["--policy-hidden", "64", "64", "--total-timesteps", 2000, "--save-model"]
TIMING = {"wall_time_s", "cpu_time_s", "startup_s", "startup_cpu_s", "sps", "args"}
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def pre_fast_path(tmp_path_factory):
    return scripts_at(PRE_FAST_PATH, tmp_path_factory.mktemp("pre_fast_path"))


def run_both(script, flags, old_folder, tmp_path):
    for name, folder in [("before", old_folder), ("after", ROOT)]:
        result = run_script(script, *flags, "--log-dir", tmp_path, "--run-name", name, script_dir=folder)
        assert result.returncode in (0, 3), result.stderr
    before, after = summary_of(tmp_path / "before"), summary_of(tmp_path / "after")
    assert {k: v for k, v in before.items() if k not in TIMING} == {k: v for k, v in after.items() if k not in TIMING}
    return before


@pytest.mark.parametrize("script,flags", [
    ("ppo_continuous.py", [*SMALL, "--anneal-lr", "--norm-adv", "--target-kl", 0.002]),
    ("cpg_continuous.py", [*SMALL, "--norm-obs", "--norm-reward"]),
    ("vpg_continuous.py", [*SMALL, "--optimizer", "sgd"]),
    ("ppo_continuous.py", [*SHIFTED_HUMANOID, "--total-timesteps", 2000, "--on-nonfinite", "skip", "--save-model"]),
])
def test_cpu_parameters_are_those_of_before(script, flags, pre_fast_path, tmp_path):
    summary = run_both(script, flags, pre_fast_path, tmp_path)
    assert summary["status"] == "completed"
    assert_equal_tensors(load(tmp_path / "before" / "model.pt")["agent"], load(tmp_path / "after" / "model.pt")["agent"])


def test_cpu_explosion_postmortem_is_that_of_before(pre_fast_path, tmp_path):
    # the steps after the non-finite one in its epoch do run on the device before the epoch's check, so the
    # postmortem is only right if the epoch is rolled back and redone up to that step
    summary = run_both("ppo_continuous.py", [*SHIFTED_HUMANOID, "--total-timesteps", 2000], pre_fast_path, tmp_path)
    assert summary["status"] == "exploded" and summary["nonfinite_updates"] == 1
    before, after = load(tmp_path / "before" / "postmortem.pt"), load(tmp_path / "after" / "postmortem.pt")
    for key in ["reason", "global_step", "iteration", "epoch"]:
        assert before[key] == after[key], key
    for key in ["minibatch", "agent", "stats"]:
        assert_equal_tensors(before[key], after[key])
    assert_equal_tensors({"loss": before["loss"], "grad_norm": before["grad_norm"]},
                         {"loss": after["loss"], "grad_norm": after["grad_norm"]})
    assert before["optimizer"]["param_groups"] == after["optimizer"]["param_groups"]
    for index, state in before["optimizer"]["state"].items():
        assert_equal_tensors(state, after["optimizer"]["state"][index])


def graphed_and_eager(script, flags, tmp_path):
    for name, extra in [("graphed", []), ("eager", ["--no-cuda-graphs"])]:
        result = run_script(script, "--cuda", *flags, *extra, "--log-dir", tmp_path, "--run-name", name)
        assert result.returncode in (0, 3), result.stderr
    return summary_of(tmp_path / "graphed"), summary_of(tmp_path / "eager")


@cuda
@pytest.mark.parametrize("fused", [False, True], ids=["own-loss", "fused-loss"])
@pytest.mark.parametrize("script", SCRIPTS)
def test_cuda_graphs_train_as_eager_cuda(script, fused, tmp_path, monkeypatch):
    monkeypatch.setenv("FUSED_LOSS_BACKEND", "extension")
    flags = ["--env-id", "Humanoid-v4", "--policy-hidden", "1024", "1024", "--total-timesteps", 1000, "--save-model",
             *(["--fused-loss"] if fused else [])]
    graphed, eager = graphed_and_eager(script, flags, tmp_path)
    assert graphed["status"] == eager["status"] == "completed"
    graphed, eager = (load(tmp_path / name / "model.pt")["agent"] for name in ("graphed", "eager"))
    for key in eager:
        torch.testing.assert_close(graphed[key], eager[key], rtol=1e-4, atol=1e-5, msg=key)


@cuda
def test_cuda_ppo_explodes_at_step_1000_with_the_eager_postmortem(tmp_path):
    graphed, eager = graphed_and_eager("ppo_continuous.py", [*SHIFTED_HUMANOID, "--total-timesteps", 3000], tmp_path)
    for summary in (graphed, eager):
        assert summary["status"] == "exploded" and summary["explosion_step"] == 1000
        assert summary["nonfinite_updates"] == 1
    graphed_pm, eager_pm = (load(tmp_path / name / "postmortem.pt") for name in ("graphed", "eager"))
    assert (graphed_pm["reason"], graphed_pm["epoch"]) == (eager_pm["reason"], eager_pm["epoch"])
    assert_equal_tensors(graphed_pm["minibatch"], eager_pm["minibatch"])
    for key in eager_pm["agent"]:
        torch.testing.assert_close(graphed_pm["agent"][key], eager_pm["agent"][key], rtol=1e-4, atol=1e-5, msg=key)
    script = load_script("ppo_continuous.py")
    for device in ["cpu", "cuda"]:
        loss, grad_norm, stats = script.replay(tmp_path / "graphed" / "postmortem.pt", device)
        assert not (torch.isfinite(loss) and torch.isfinite(grad_norm)), device
        assert int(stats["n_overflow"]) == int(graphed_pm["stats"]["n_overflow"]) > 0, device


@cuda
def test_cuda_cpg_completes_the_shifted_mean(tmp_path):
    graphed, eager = graphed_and_eager("cpg_continuous.py", [*SHIFTED_HUMANOID, "--total-timesteps", 3000], tmp_path)
    for summary in (graphed, eager):
        assert summary["status"] == "completed" and summary["global_step"] == 3000
        assert summary["nonfinite_updates"] == 0


@cuda
def test_cuda_skip_mode_counts_as_eager(tmp_path):
    graphed, eager = graphed_and_eager(
        "ppo_continuous.py", [*SHIFTED_HUMANOID, "--total-timesteps", 2000, "--on-nonfinite", "skip"], tmp_path)
    assert graphed["status"] == eager["status"] == "completed"
    assert graphed["nonfinite_updates"] == eager["nonfinite_updates"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_sps_benchmark_cuda_needs_no_sb3_and_says_why_it_cannot_run(tmp_path):
    bench = [sys.executable, str(ROOT / "benchmarks" / "bench_sps.py")]
    result = subprocess.run([*bench, "--cuda"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stderr.strip() == "error: --cuda needs a CUDA GPU"
    assert "stable-baselines3" not in result.stdout
    result = subprocess.run([*bench, "--cuda", "--cases", "hopper-1024"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "choose from humanoid-1024x1024 hopper-64x64" in result.stderr
