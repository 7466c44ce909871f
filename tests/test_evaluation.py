"""--eval-every: the deterministic policy on an env of its own, which must leave training untouched; and the
closed-form KL of the stability telemetry, which must stay accurate between close Gaussians."""
import numpy as np
import pytest
import torch

from tests.helpers import SCRIPTS, TINY, cli_in_process, interrupt, load_script, run_script, scalars_of, summary_of

HOPPER = ["--env-id", "Hopper-v4", *TINY, "--num-steps", 256, "--total-timesteps", 768, "--save-model"]
EVAL = ["--eval-every", 512, "--eval-episodes", 2]
# every step's reward is the action: an episode's return is its length times the action, here 4 and 2 steps
ACTION_REWARD = ["--env-id", "tests.envs:ActionReward-v0", *TINY, "--num-steps", 32, "--minibatch-size", 32, "--total-timesteps", 64,
                 "--eval-every", 32, "--eval-episodes", 2]


def trained(script, args, run_dir):
    result = run_script(script, *args, "--log-dir", run_dir.parent, "--run-name", run_dir.name)
    assert result.returncode == 0, result.stderr
    return summary_of(run_dir), torch.load(run_dir / "model.pt", weights_only=False)["agent"], scalars_of(run_dir, True)


@pytest.mark.parametrize("script,flags", [("ppo_continuous.py", []), ("cpg_continuous.py", ["--norm-obs"]),
                                          ("vpg_continuous.py", ["--squash", "tanh"])])
def test_evaluating_leaves_training_bit_identical(script, flags, tmp_path):
    summary_plain, plain, scalars_plain = trained(script, [*HOPPER, *flags], tmp_path / "plain")
    summary_eval, evaluated, scalars_eval = trained(script, [*HOPPER, *flags, *EVAL], tmp_path / "evaluated")
    assert plain.keys() == evaluated.keys() and all(torch.equal(plain[k], evaluated[k]) for k in plain)
    returns = scalars_eval.pop("eval/episodic_return")
    for scalars in (scalars_plain, scalars_eval):
        del scalars["charts/SPS"]
    assert scalars_eval == scalars_plain
    timing = {"wall_time_s", "cpu_time_s", "startup_s", "startup_cpu_s", "sps", "args"}
    assert {k: v for k, v in summary_plain.items() if k not in timing} == \
        {k: v for k, v in summary_eval.items() if k not in timing | {"eval_return", "max_eval_return", "eval_step"}}
    assert "eval_return" not in summary_plain
    # at 512 (the first multiple passed) and at the end (768)
    assert [step for step, _ in returns] == [512, 768]
    assert summary_eval["eval_return"] == pytest.approx(returns[-1][1])
    assert summary_eval["max_eval_return"] == pytest.approx(max(value for _, value in returns))
    assert summary_eval["eval_step"] == 768


@pytest.mark.parametrize("script", SCRIPTS)
def test_evaluation_takes_the_mean_clipped_to_the_box(script, tmp_path):
    # the mean shifted to 5: clipped to the box's edge 1 it earns 1 per step, (4 + 2) / 2 on average
    summary, _, _ = trained(script, [*ACTION_REWARD, "--mean-shift", 5, "--save-model"], tmp_path / "clipped")
    assert summary["eval_return"] == 3.0 and summary["max_eval_return"] == 3.0
    # squashed, the same mean gives tanh(5) short of the edge; a mean of -0.5 inside the box is taken as it is
    summary, _, _ = trained(script, [*ACTION_REWARD, "--mean-shift", 5, "--squash", "tanh", "--save-model"],
                            tmp_path / "squashed")
    assert summary["eval_return"] == pytest.approx(3 * np.tanh(5), abs=0.01) and summary["eval_return"] < 3.0
    summary, _, _ = trained(script, [*ACTION_REWARD, "--mean-shift", -0.5, "--save-model"], tmp_path / "inside")
    assert summary["eval_return"] == pytest.approx(3 * -0.5, abs=0.1)


def test_evaluation_env_is_reseeded_and_normalised_with_frozen_training_statistics():
    module = load_script("cpg_continuous.py")
    args = module.Args(env_id="Hopper-v4", policy_hidden=(8,), value_hidden=(8,), norm_obs=True, eval_episodes=1)
    envs = module.make_envs(args, "/tmp")
    envs.reset(seed=1)
    for _ in range(20):
        envs.step(np.zeros((1, 3), np.float32))
    train_stats = module.obs_normaliser(envs.envs[0]).obs_rms
    eval_env = module.make_eval_env(args, "/tmp")
    agent = module.Agent(11, envs.single_action_space.low, envs.single_action_space.high, args)
    first = module.evaluate(agent, eval_env, envs.envs[0], args, torch.device("cpu"))
    assert module.evaluate(agent, eval_env, envs.envs[0], args, torch.device("cpu")) == first  # same start states
    frozen = module.obs_normaliser(eval_env)
    assert not frozen.update_running_mean and frozen.obs_rms is not train_stats
    np.testing.assert_array_equal(frozen.obs_rms.mean, train_stats.mean)
    assert module.obs_normaliser(envs.envs[0]).obs_rms.count == train_stats.count  # training's are untouched


def test_resumed_run_evaluates_as_an_uncut_one(tmp_path):
    args = ["--env-id", "Hopper-v4", *TINY, "--num-steps", 64, "--minibatch-size", 64, "--total-timesteps", 384,
            "--eval-every", 128, "--eval-episodes", 1]
    whole = run_script("ppo_continuous.py", *args, "--log-dir", tmp_path, "--run-name", "whole")
    assert whole.returncode == 0, whole.stderr
    cut = interrupt("ppo_continuous.py", *args, "--log-dir", tmp_path, "--run-name", "cut", after=3)
    assert cut.returncode == 130, cut.stderr
    resumed = run_script("ppo_continuous.py", "--resume", tmp_path / "cut")
    assert resumed.returncode == 0, resumed.stderr
    expected, got = scalars_of(tmp_path / "whole", True), scalars_of(tmp_path / "cut", True)
    assert [s for s, _ in expected["eval/episodic_return"]] == [128, 256, 384]
    assert got["eval/episodic_return"] == expected["eval/episodic_return"]
    assert {k: summary_of(tmp_path / "cut")[k] for k in ("eval_return", "max_eval_return", "eval_step")} == \
        {k: summary_of(tmp_path / "whole")[k] for k in ("eval_return", "max_eval_return", "eval_step")}


@pytest.mark.parametrize("flag,value,message", [("--eval-every", -1, "--eval-every must be non-negative"),
                                                ("--eval-episodes", 0, "--eval-episodes must be positive")])
def test_bad_evaluation_flags(flag, value, message):
    for script in SCRIPTS:
        code, stderr = cli_in_process(script, flag, value)
        assert code == 2 and stderr.startswith(f"error: {message}") and len(stderr.splitlines()) == 1


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("apart", [1e-1, 1e-3, 1e-4])
def test_kl_of_close_gaussians_is_as_accurate_as_torchs(script, apart):
    """float32 Gaussians apart by `apart` (means absolutely, stds relatively), against float64."""
    module = load_script(script)
    gen = torch.Generator().manual_seed(0)
    mean, std = torch.randn(1000, 6, generator=gen), torch.rand(1000, 6, generator=gen) + 0.1
    old_mean = mean + apart * torch.randn(1000, 6, generator=gen)
    old_std = std * (1 + apart * torch.randn(1000, 6, generator=gen))
    normals = [torch.distributions.Normal(m, s) for m, s in [(mean, std), (old_mean, old_std)]]
    torch_kl = torch.distributions.kl_divergence(*normals).sum(-1)
    exact = module.gaussian_kl(*(x.double() for x in (mean, std, old_mean, old_std)))
    textbook = torch.distributions.kl_divergence(*(torch.distributions.Normal(n.loc.double(), n.scale.double())
                                                   for n in normals)).sum(-1)
    torch.testing.assert_close(exact, textbook, rtol=1e-6, atol=0)  # the float64 reference agrees with torch's
    ours = module.gaussian_kl(mean, std, old_mean, old_std)
    ours_error = ((ours.double() - exact).abs() / exact).max()
    assert ours_error <= ((torch_kl.double() - exact).abs() / exact).max()
    assert ours_error < 1e-5 and ours.mean() > 0
