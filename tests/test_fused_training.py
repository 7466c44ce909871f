"""The training scripts give the same result with the fused surrogate op as with their own loss."""
import pytest
import torch

from tests.test_training import SCRIPTS, SHIFTED_HUMANOID, TINY, run, summary_of

SHORT = [*TINY, "--total-timesteps", 1000, "--num-steps", 500, "--minibatch-size", 50, "--save-model"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_fused_loss_trains_to_the_same_parameters(script, tmp_path):
    for name, flags in [("own", []), ("fused", ["--fused-loss"])]:
        result = run(script, *SHORT, *flags, "--log-dir", tmp_path, "--run-name", name)
        assert result.returncode == 0, result.stderr
    own = torch.load(tmp_path / "own" / "model.pt", weights_only=False)["agent"]
    fused = torch.load(tmp_path / "fused" / "model.pt", weights_only=False)["agent"]
    assert own.keys() == fused.keys()
    for key in own:
        torch.testing.assert_close(fused[key], own[key], rtol=1e-4, atol=1e-5, msg=key)
    assert summary_of(tmp_path / "own")["final_return"] == pytest.approx(summary_of(tmp_path / "fused")["final_return"])


def test_fused_loss_detects_the_same_explosion(tmp_path):
    for name, flags in [("own", []), ("fused", ["--fused-loss"])]:
        result = run("ppo_continuous.py", *SHIFTED_HUMANOID, "--total-timesteps", 5000, *flags,
                     "--log-dir", tmp_path, "--run-name", name)
        assert result.returncode == 3, result.stderr
    own, fused = summary_of(tmp_path / "own"), summary_of(tmp_path / "fused")
    for field in ["status", "explosion_step", "explosion_reason", "nonfinite_updates"]:
        assert own[field] == fused[field]
    own_pm = torch.load(tmp_path / "own" / "postmortem.pt", weights_only=False)
    fused_pm = torch.load(tmp_path / "fused" / "postmortem.pt", weights_only=False)
    assert own_pm["epoch"] == fused_pm["epoch"]
    # the op's n_overflow stat says why: exp(log-ratio) overflowed float32
    assert int(fused_pm["stats"]["n_overflow"]) == int(own_pm["stats"]["n_overflow"]) > 0
