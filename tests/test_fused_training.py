"""The training scripts give the same result with the fused surrogate op as with their own loss.

Every test runs with FUSED_LOSS_BACKEND=extension: --fused-loss then fails where it would
otherwise fall back to the reference without a word (the scripts run with PYTHONWARNINGS=ignore).
"""
import pytest
import torch

from tests.helpers import SCRIPTS, SHIFTED_HUMANOID, TINY, load_script, run_script, scalars_of, summary_of

# lr 3e-3 and 10 epochs move a fifth to a third of the log-ratios out of the clip range, so the
# clipped branch of PPO's and CPG's objective, and where its bounds lie, shape the parameters
SHORT = [*TINY, "--total-timesteps", 1000, "--num-steps", 500, "--minibatch-size", 50, "--learning-rate", 3e-3,
         "--update-epochs", 10, "--save-model"]


@pytest.fixture(autouse=True)
def extension_only(monkeypatch):
    monkeypatch.setenv("FUSED_LOSS_BACKEND", "extension")


@pytest.mark.parametrize("script", SCRIPTS)
def test_fused_loss_trains_to_the_same_parameters(script, tmp_path):
    for name, flags in [("own", []), ("fused", ["--fused-loss"])]:
        result = run_script(script, *SHORT, *flags, "--log-dir", tmp_path, "--run-name", name)
        assert result.returncode == 0, result.stderr
    own = torch.load(tmp_path / "own" / "model.pt", weights_only=False)["agent"]
    fused = torch.load(tmp_path / "fused" / "model.pt", weights_only=False)["agent"]
    assert own.keys() == fused.keys()
    for key in own:
        torch.testing.assert_close(fused[key], own[key], rtol=1e-4, atol=1e-5, msg=key)
    assert summary_of(tmp_path / "own")["final_return"] == pytest.approx(summary_of(tmp_path / "fused")["final_return"])
    own_log, fused_log = scalars_of(tmp_path / "own"), scalars_of(tmp_path / "fused")
    for tag in ["losses/clipfrac", "losses/approx_kl", "stability/max_log10_ratio"]:
        assert fused_log[tag] == pytest.approx(own_log[tag], rel=1e-4), tag
    assert min(own_log["losses/clipfrac"]) > 0.1


def test_fused_loss_fails_rather_than_fall_back(tmp_path, monkeypatch):
    # so the other tests, which pass, did train with the op: a build that cannot compile stops the run
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    monkeypatch.setenv("CXX", "false")
    result = run_script("ppo_continuous.py", *SHORT, "--fused-loss", "--log-dir", tmp_path, "--run-name", "fused")
    assert result.returncode == 1
    assert "error: fused_loss: backend='extension' is unavailable: extension build failed" in result.stderr


def test_fused_loss_detects_the_same_explosion(tmp_path):
    for name, flags in [("own", []), ("fused", ["--fused-loss"])]:
        result = run_script("ppo_continuous.py", *SHIFTED_HUMANOID, "--total-timesteps", 5000, *flags,
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
    # the postmortem replays, through the op, to the loss and gradient that stopped the run
    loss, grad_norm, stats = load_script("ppo_continuous.py").replay(tmp_path / "fused" / "postmortem.pt")
    assert fused["explosion_reason"] == "non-finite gradient norm" and not torch.isfinite(grad_norm)
    torch.testing.assert_close(loss, fused_pm["loss"])
    torch.testing.assert_close(grad_norm, fused_pm["grad_norm"], equal_nan=True)
    assert int(stats["n_overflow"]) == int(fused_pm["stats"]["n_overflow"])
