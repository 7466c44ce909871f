"""The three training scripts: data correctness, telemetry, flags, explosions, and bad input."""
import copy
import json
import math
import shutil
import signal
import sys

import numpy as np
import pytest
import torch

from tests.helpers import (ROOT, SCRIPTS, SHIFTED_HUMANOID, STAGGERED, TINY, cli_in_process, completed_run, interrupt,
                           load_script, run_script, scalars_of, summary_of)

STABILITY_SCALARS = [
    "stability/max_log10_ratio", "stability/max_log10_ratio_raw", "stability/log10_kl", "stability/min_std",
    "stability/mean_abs_advantage", "stability/max_abs_mean", "stability/frac_mean_outside",
    "stability/min_old_log_prob", "stability/grad_norm", "stability/policy_l2_from_init",
    "stability/nonfinite_updates",
]
CLEANRL_SCALARS = [
    "charts/episodic_return", "charts/episodic_length", "charts/SPS", "charts/learning_rate",
    "losses/policy_loss", "losses/value_loss", "losses/entropy", "losses/approx_kl", "losses/clipfrac",
    "losses/explained_variance",
]
SUMMARY_FIELDS = [
    "algo", "env_id", "seed", "args", "status", "global_step", "total_timesteps", "exploded", "explosion_step",
    "explosion_reason", "nonfinite_updates", "episodes", "final_return", "max_return", "max_log10_ratio",
    "wall_time_s", "sps", "versions",
]
# rewards x1000 keep every advantage of a run this short positive (the critic is still near 0), so the
# clipped ratio is min(r, 1 + eps); lr 1e-2 moves ratios past 1 + eps within the epochs
POSITIVE_ADVANTAGES = ["--reward-scale", 1000, "--learning-rate", 0.01]


@pytest.fixture(scope="module", params=SCRIPTS)
def script(request):
    return request.param


def test_gae_hand_computed(script):
    module = load_script(script)
    # three steps of two envs. Env 0: the second step ends by truncation (bootstrap from its final
    # observation, value 2.0), the third by termination (no bootstrap). Env 1: the rollout cuts its
    # episode short (bootstrap from the value 2.0 of the state it reached, nothing to accumulate past it)
    rewards = np.ones((3, 2))
    values = np.full((3, 2), 0.5)
    next_values = np.array([[0.5, 0.5], [2.0, 0.5], [0.5, 2.0]])
    terminations = np.array([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0]])
    episode_ends = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    advantages, returns = module.compute_gae(rewards, values, next_values, terminations, episode_ends, 0.5, 0.5)
    # env 0: t=2: 1 - 0.5; t=1: 1 + 0.5 * 2.0 - 0.5 (no accumulation across the end); t=0: 0.75 + 0.25 * 1.5
    # env 1: t=2: 1 + 0.5 * 2.0 - 0.5; t=1: 0.75 + 0.25 * 1.5; t=0: 0.75 + 0.25 * 1.125
    np.testing.assert_allclose(advantages, [[1.125, 1.03125], [1.5, 1.125], [0.5, 1.5]])
    np.testing.assert_allclose(returns, advantages + 0.5)


def counter_rollout(script, env_id, num_envs=1, num_steps=10, **args):
    """One rollout of a tests.envs counter, with V(t, episode) = t + 10 * episode as the critic:
    (batch, rollout, [(step, return, length) of each episode], global step)."""
    sys.path.insert(0, str(ROOT))
    module = load_script(script)
    args = module.Args(env_id=env_id, num_envs=num_envs, num_steps=num_steps, policy_hidden=(8,), value_hidden=(8,),
                       total_timesteps=num_envs * num_steps, minibatch_size=num_envs * num_steps, **args)
    envs = module.make_envs(args, "unused")
    agent = module.Agent(2, envs.single_action_space.low, envs.single_action_space.high, args)
    agent.get_value = lambda obs: obs[..., 0] + 10 * obs[..., 1]
    episodes = []
    next_obs, _ = envs.reset(seed=0)
    policy_mean = module.make_policy_mean(agent, num_envs, 2, torch.device("cpu"), graphed=False)
    batch, rollout, next_obs, step = module.collect_rollout(
        envs, agent, policy_mean, next_obs, args, torch.device("cpu"), 0, lambda *episode: episodes.append(episode))
    envs.close()
    return batch, rollout, episodes, step


def test_rollout_respects_episode_boundaries(script):
    batch, rollout, episodes, step = counter_rollout(script, "tests.envs:Counter-v0", gamma=0.9, gae_lambda=0.8)
    # episode 0 truncated after 4 steps, episode 1 terminated after 2, episode 2 truncated after 4
    assert batch["obs"][:, 0].tolist() == [0, 1, 2, 3, 0, 1, 0, 1, 2, 3]
    assert batch["obs"][:, 1].tolist() == [0, 0, 0, 0, 1, 1, 2, 2, 2, 2]
    assert rollout["episode_ends"][:, 0].tolist() == [0, 0, 0, 1, 0, 1, 0, 0, 0, 1]
    assert rollout["terminations"][:, 0].tolist() == [0, 0, 0, 0, 0, 1, 0, 0, 0, 0]
    # truncated episodes bootstrap from V(final observation) = 4 and 24, not from the reset's 10 and 30
    assert rollout["next_values"][[3, 9], 0].tolist() == [4, 24]
    assert [(ret, length) for _, ret, length in episodes] == [(4.0, 4), (2.0, 2), (4.0, 4)]
    assert step == 10
    advantages = rollout["advantages"][:, 0]
    assert advantages[3] == pytest.approx(1 + 0.9 * 4 - 3)  # last step of a truncated episode
    assert advantages[5] == pytest.approx(1 - 11)  # terminated: no bootstrap
    assert advantages[4] == pytest.approx(1 + 0.9 * 11 - 10 + 0.9 * 0.8 * advantages[5])


def test_rollout_bootstraps_each_envs_own_truncations(script):
    batch, rollout, episodes, step = counter_rollout(script, "tests.envs:StaggeredCounter-v0", num_envs=3, num_steps=6)
    # env i truncates after limit = 2 + i steps, alone or with others: transition s of env i is step
    # s % limit + 1 of episode s // limit, and reaches the state of that value (its final observation at
    # a truncation, not the reset one)
    steps, limits = np.arange(6)[:, None], np.array([2, 3, 4])
    np.testing.assert_array_equal(rollout["episode_ends"], steps % limits == limits - 1)
    np.testing.assert_array_equal(rollout["next_values"], steps % limits + 1 + 10 * (steps // limits))
    assert not rollout["terminations"].any()
    assert sorted(length for _, _, length in episodes) == [2, 2, 2, 3, 3, 4] and step == 18


def test_closed_form_kl_matches_torch():
    module = load_script("ppo_continuous.py")
    gen = torch.Generator().manual_seed(0)
    mean, old_mean = torch.randn(50, 6, generator=gen), torch.randn(50, 6, generator=gen)
    std, old_std = torch.rand(50, 6, generator=gen) + 0.1, torch.rand(50, 6, generator=gen) + 0.1
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, std), torch.distributions.Normal(old_mean, old_std)).sum(-1)
    torch.testing.assert_close(module.gaussian_kl(mean, std, old_mean, old_std), expected)


def test_gaussian_log_prob_matches_torch():
    module = load_script("ppo_continuous.py")
    actions, mean, std = torch.randn(20, 3), torch.randn(20, 3) * 5, torch.rand(3) + 0.1
    expected = torch.distributions.Normal(mean, std).log_prob(actions).sum(-1)
    torch.testing.assert_close(module.gaussian_log_prob(actions, mean, std), expected)


@pytest.mark.parametrize("script_name,kind", [("ppo_continuous.py", "ppo"), ("cpg_continuous.py", "cpg")])
def test_max_log_ratio_clipped_and_raw(script_name, kind):
    module = load_script(script_name)
    # log-ratios ln 1000 (advantage > 0: the objective clips it to ln 1.2), ln 10 (advantage < 0: used
    # as is) and -ln 4 (advantage < 0: clipped up to ln 0.8)
    log_ratio = torch.tensor([math.log(1000), math.log(10), -math.log(4)], dtype=torch.float64)
    advantages = torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64)
    _, stats = module.surrogate(log_ratio, torch.zeros(3, dtype=torch.float64), advantages, 0.2, kind)
    assert float(stats["max_log_ratio"]) / math.log(10) == pytest.approx(3)
    assert float(stats["max_log_ratio_effective"]) / math.log(10) == pytest.approx(1)
    assert float(stats["min_log_ratio"]) == pytest.approx(-math.log(4))
    assert float(stats["clip_frac"]) == 1
    # with a positive advantage on the ln 10 element too, the largest ratio the objective uses is 1.2
    _, stats = module.surrogate(log_ratio, torch.zeros(3, dtype=torch.float64), advantages.abs(), 0.2, kind)
    assert float(stats["max_log_ratio_effective"]) == pytest.approx(math.log(1.2))


def test_ppo_ratio_overflow_is_counted():
    module = load_script("ppo_continuous.py")
    new_logp = torch.tensor([100.0, 0.0], requires_grad=True)
    loss, stats = module.surrogate(new_logp, torch.zeros(2), torch.tensor([-1.0, 1.0]), 0.2, "ppo")
    assert int(stats["n_overflow"]) == 1 and math.isinf(float(stats["approx_kl"])) and math.isinf(float(loss.detach()))


def test_copied_alone_trains_and_logs_everything(script, tmp_path):
    shutil.copy(ROOT / script, tmp_path / script)
    result = run_script(script, "--total-timesteps", 1000, "--num-steps", 500, *TINY, cwd=tmp_path, script_dir=tmp_path,
                        warnings="default")
    assert result.returncode == 0, result.stderr
    assert "is out of date" not in result.stderr  # Hopper-v4 is the paper's: no warning about v5
    (run_dir,) = (tmp_path / "runs").iterdir()
    summary = summary_of(run_dir)
    assert result.stdout.splitlines()[-1] == (f"completed 1000 steps in runs/{run_dir.name}: final return "
                                              f"{summary['final_return']:.1f} (mean of the last 10 episodes)")
    assert set(SUMMARY_FIELDS) <= set(summary)
    assert summary["status"] == "completed" and summary["global_step"] == 1000 and not summary["exploded"]
    assert summary["algo"] == script[:3] and summary["episodes"] > 0
    scalars = scalars_of(run_dir)
    missing = [tag for tag in STABILITY_SCALARS + CLEANRL_SCALARS if tag not in scalars]
    assert not missing
    assert len(scalars["stability/max_log10_ratio"]) == 2  # every iteration
    assert scalars["stability/min_std"][0] == pytest.approx(1.0, rel=1e-2)  # --init-std 1
    assert len(scalars["charts/episodic_return"]) == summary["episodes"]
    returns = scalars["charts/episodic_return"]
    assert summary["final_return"] == pytest.approx(np.mean(returns[-10:]), rel=1e-5)


def test_fused_loss_without_the_module_is_a_clear_error(tmp_path):
    shutil.copy(ROOT / "ppo_continuous.py", tmp_path)
    # shadows an installed fused_loss (pip install -e . puts it on every path), as if it were missing
    (tmp_path / "fused_loss.py").write_text("raise ImportError('No module named fused_loss')\n")
    result = run_script("ppo_continuous.py", "--fused-loss", *TINY, "--total-timesteps", 1000,
                 cwd=tmp_path, script_dir=tmp_path, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "fused_loss.py" in result.stderr


def test_ppo_explodes_with_a_shifted_mean_and_the_postmortem_replays(tmp_path):
    result = run_script("ppo_continuous.py", *SHIFTED_HUMANOID, "--total-timesteps", 5000, "--log-dir", tmp_path,
                 "--run-name", "ppo")
    assert result.returncode == 3, result.stderr
    assert "EXPLODED" in result.stdout
    summary = summary_of(tmp_path / "ppo")
    assert summary["status"] == "exploded" and summary["exploded"]
    # the overflowed ratio of a positive advantage is clipped out of the loss, but not of its gradient
    assert summary["explosion_reason"] == "non-finite gradient norm"
    assert summary["explosion_step"] <= 2000 and summary["nonfinite_updates"] == 1
    assert not (tmp_path / "ppo" / "checkpoint.pt").exists()  # an exploded run has nothing to resume
    postmortem = tmp_path / "ppo" / "postmortem.pt"
    saved = torch.load(postmortem, weights_only=False)
    assert int(saved["stats"]["n_overflow"]) > 0  # the ratio overflowed float32: the paper's mechanism
    loss, grad_norm, stats = load_script("ppo_continuous.py").replay(postmortem)
    assert not (math.isfinite(loss) and math.isfinite(grad_norm))
    torch.testing.assert_close(loss, saved["loss"], equal_nan=True)
    assert int(stats["n_overflow"]) == int(saved["stats"]["n_overflow"])
    assert "stability/max_log10_ratio_raw" in scalars_of(tmp_path / "ppo")


def test_cpg_survives_the_same_shifted_mean(tmp_path):
    result = run_script("cpg_continuous.py", *SHIFTED_HUMANOID, "--total-timesteps", 3000, "--log-dir", tmp_path,
                 "--run-name", "cpg")
    assert result.returncode == 0, result.stderr
    summary = summary_of(tmp_path / "cpg")
    assert summary["status"] == "completed" and summary["global_step"] == 3000
    assert summary["nonfinite_updates"] == 0
    assert not (tmp_path / "cpg" / "postmortem.pt").exists()


def test_skip_mode_counts_and_goes_on(tmp_path):
    result = run_script("ppo_continuous.py", *SHIFTED_HUMANOID, "--total-timesteps", 2000, "--on-nonfinite", "skip",
                 "--log-dir", tmp_path, "--run-name", "skip")
    assert result.returncode == 0, result.stderr
    summary = summary_of(tmp_path / "skip")
    assert summary["status"] == "completed" and summary["nonfinite_updates"] > 0
    assert scalars_of(tmp_path / "skip")["stability/nonfinite_updates"][-1] == summary["nonfinite_updates"]


@pytest.mark.parametrize("args,message", [
    (["--env-id", "CartPole-v1"], "Discrete action space"),
    (["--env-id", "NoSuchEnv-v0"], "cannot make env"),
    (["--minibatch-size", "2000"], "larger than the rollout"),
    (["--learning-rate", "0"], "--learning-rate"),
    (["--learning-rate", "-1e-3"], "--learning-rate"),
    (["--learning-rate", "inf"], "--learning-rate"),
    (["--clip-coef", "0"], "--clip-coef"),
    (["--clip-coef", "1"], "--clip-coef"),
    (["--min-std", "1", "--init-std", "0.5"], "--init-std"),
    (["--total-timesteps", "10"], "smaller than one rollout"),
    pytest.param(["--cuda"], "no CUDA GPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")),
])
def test_bad_input_is_one_line_and_exit_2(script, args, message, tmp_path):
    # a check that is missed trains for one tiny iteration here, and fails on its exit code
    code, stderr = cli_in_process(script, *TINY, "--total-timesteps", 1000, *args, "--log-dir", tmp_path)
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]
    assert not any(tmp_path.iterdir())  # nothing started


def test_bad_input_in_cpg_and_vpg_too(tmp_path):
    for script in ["cpg_continuous.py", "vpg_continuous.py"]:
        result = run_script(script, "--env-id", "CartPole-v1", "--log-dir", tmp_path)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("env_id", ["tests.envs:NonFinite-v0", "tests.envs:NonFiniteReward-v0"])
def test_nonfinite_environment_is_not_an_explosion(env_id, tmp_path):
    result = run_script("ppo_continuous.py", "--env-id", env_id, *TINY, "--num-steps", 50,
                 "--total-timesteps", 100, "--minibatch-size", 10, "--log-dir", tmp_path, "--run-name", "nan")
    assert result.returncode == 1
    assert "non-finite observation or reward" in result.stderr and "Traceback" not in result.stderr
    summary = summary_of(tmp_path / "nan")
    assert summary["status"] == "error" and not summary["exploded"] and "non-finite" in summary["error"]
    error = (tmp_path / "nan" / "error.txt").read_text()
    assert "EnvNonFinite" in error and "non-finite observation or reward" in error


def test_nonfinite_reason_names_what_went_wrong(script):
    module = load_script(script)
    finite, broken = [torch.ones(2), torch.ones(3)], [torch.ones(2), torch.tensor([1.0, math.inf, 1.0])]
    assert module.nonfinite_reason(torch.tensor(math.nan), broken) == "non-finite parameter"
    assert module.nonfinite_reason(torch.tensor(math.inf), finite) == "non-finite loss"
    assert module.nonfinite_reason(torch.tensor(1.0), finite) == "non-finite gradient norm"


def test_overflowing_parameters_are_the_explosion_reason(tmp_path):
    # an SGD step of lr 1e300 takes the parameters to inf; the next minibatch finds them so
    result = run_script("ppo_continuous.py", "--env-id", "tests.envs:Counter-v0", *TINY, "--num-steps", 32,
                 "--minibatch-size", 16, "--total-timesteps", 64, "--optimizer", "sgd", "--learning-rate", 1e300,
                 "--log-dir", tmp_path, "--run-name", "inf")
    assert result.returncode == 3, result.stderr
    summary = summary_of(tmp_path / "inf")
    assert summary["status"] == "exploded" and summary["explosion_reason"] == "non-finite parameter"


@pytest.mark.parametrize("script_name", ["ppo_continuous.py", "cpg_continuous.py"])
def test_clipped_and_raw_ratio_scaled_rewards_annealed_lr_three_envs(script_name, tmp_path):
    run_dir = tmp_path / "run"
    scalars = completed_run(script_name, *STAGGERED, *POSITIVE_ADVANTAGES, "--anneal-lr", run_dir=run_dir)
    # with every advantage positive the objective's ratio is min(r, 1 + eps): clipped, while the raw
    # ratio goes past it
    clipped, raw = scalars["stability/max_log10_ratio"], scalars["stability/max_log10_ratio_raw"]
    assert min(raw) > math.log10(1.2)
    assert clipped == pytest.approx([math.log10(1.2)] * 2, rel=1e-6)
    assert summary_of(run_dir)["max_log10_ratio"] == pytest.approx(max(clipped))
    # the advantages are of rewards x1000, the logged returns of the env's own reward of 1 per step
    assert min(scalars["stability/mean_abs_advantage"]) > 100
    assert scalars["charts/episodic_return"] == scalars["charts/episodic_length"]
    # 64 steps in each env, whose episodes last 2, 3 and 4 steps
    assert set(scalars["charts/episodic_length"]) == {2, 3, 4}
    assert summary_of(run_dir)["episodes"] == 64 // 2 + 64 // 3 + 64 // 4
    assert scalars["charts/learning_rate"] == pytest.approx([0.01, 0.005])


@pytest.mark.parametrize("script_name,flags,unclipped,mean_transform", [
    ("ppo_continuous.py", [*POSITIVE_ADVANTAGES, "--objective", "kl-penalty", "--std-param", "exp",
                           "--mean-transform", "clip"], True, "clip"),
    ("ppo_continuous.py", [*POSITIVE_ADVANTAGES, "--objective", "none", "--target-kl", 0.01], True, None),
    ("vpg_continuous.py", ["--norm-adv", "--optimizer", "sgd", "--learning-rate", 0.1, "--mean-transform", "tanh"],
     False, "tanh"),
])
def test_flags_train_and_take_effect(script_name, flags, unclipped, mean_transform, tmp_path):
    scalars = completed_run(script_name, *STAGGERED, "--mean-shift", 5, *flags, run_dir=tmp_path / "run")
    if unclipped:  # these objectives use the ratio as it is
        assert scalars["stability/max_log10_ratio"] == scalars["stability/max_log10_ratio_raw"]
        assert min(scalars["stability/max_log10_ratio_raw"]) > math.log10(1.2)
    if mean_transform:  # the shifted mean (about 5) is mapped into the box [-1, 1]
        assert max(scalars["stability/max_abs_mean"]) <= 1 and max(scalars["stability/frac_mean_outside"]) == 0
    else:
        assert min(scalars["stability/frac_mean_outside"]) == 1


def test_minibatch_loss_follows_objective_and_norm_adv():
    module = load_script("ppo_continuous.py")
    gen = torch.Generator().manual_seed(0)
    args = module.Args(policy_hidden=(8,), value_hidden=(8,), kl_coef=0.5)
    agent = module.Agent(3, np.full(2, -1.0), np.full(2, 1.0), args)
    mb = {"obs": torch.randn(16, 3, generator=gen), "actions": torch.randn(16, 2, generator=gen),
          "old_means": torch.randn(16, 2, generator=gen), "old_std": torch.full((16, 2), 0.8),
          "advantages": torch.randn(16, generator=gen) + 0.5, "returns": torch.randn(16, generator=gen)}
    mb["logprobs"] = module.gaussian_log_prob(mb["actions"], mb["old_means"], mb["old_std"])
    with torch.no_grad():
        mean, std = agent.mean(mb["obs"]), agent.std()
        ratio = (module.gaussian_log_prob(mb["actions"], mean, std) - mb["logprobs"]).exp()
        kl = module.gaussian_kl(mean, std, mb["old_means"], mb["old_std"]).mean()
        for norm_adv in [False, True]:
            adv = mb["advantages"]
            if norm_adv:
                adv = (adv - adv.mean()) / adv.std(correction=0)
            expected = {"clip": -torch.minimum(ratio * adv, ratio.clamp(0.8, 1.2) * adv).mean(),
                        "none": -(ratio * adv).mean(), "kl-penalty": -(ratio * adv).mean() + 0.5 * kl}
            for objective, loss in expected.items():
                args.objective, args.norm_adv = objective, norm_adv
                pg_loss = module.minibatch_loss(agent, mb, args, module.surrogate)[1]
                torch.testing.assert_close(pg_loss, loss, msg=f"{objective} norm_adv={norm_adv}")


def test_interrupt_leaves_summary_and_logs(tmp_path):
    result = interrupt("ppo_continuous.py", *TINY, "--num-steps", 200, "--minibatch-size", 50,
                       "--log-dir", tmp_path, "--run-name", "int", after=2, signum=signal.SIGINT)
    assert result.returncode == 130
    summary = summary_of(tmp_path / "int")
    assert summary["status"] == "interrupted" and summary["global_step"] >= 400
    assert len(scalars_of(tmp_path / "int")["stability/max_log10_ratio"]) >= 2


def counter_args(module, run_dir, **args):
    """Args of a short run on tests.envs' Counter (two iterations of 32 steps), logging into run_dir."""
    return module.Args(env_id="tests.envs:Counter-v0", policy_hidden=(8,), value_hidden=(8,), num_steps=32,
                       total_timesteps=64, log_dir=str(run_dir.parent), run_name=run_dir.name, **args)


def test_train_from_python_returns_the_summary_and_leaves_the_handlers(script, tmp_path, capsys):
    module = load_script(script)
    handlers = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: lambda signum, frame: None}
    for signum, handler in handlers.items():
        signal.signal(signum, handler)
    args = counter_args(module, tmp_path / "run", eval_every=32, eval_episodes=1,
                        **({"minibatch_size": 16} if script != "vpg_continuous.py" else {}))
    given = copy.deepcopy(args)
    summary = module.train(args)
    assert {signum: signal.getsignal(signum) for signum in handlers} == handlers
    assert json.loads(json.dumps(summary)) == summary_of(tmp_path / "run")  # args' tuples are lists there
    assert summary["status"] == "completed" and summary["global_step"] == 64 and summary["eval_step"] == 64
    assert args == given  # the caller's Args are left alone (VPG fills in its minibatch size in its own copy)
    assert summary["args"]["minibatch_size"] == (32 if script == "vpg_continuous.py" else 16)
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"completed 64 steps in {tmp_path / 'run'}: final return {summary['final_return']:.1f} "
        f"(mean of the last 10 episodes), evaluation return {summary['eval_return']:.1f}")


def test_train_from_python_raises_on_bad_input(tmp_path):
    module = load_script("ppo_continuous.py")
    with pytest.raises(module.BadArgument, match="^--learning-rate must be positive$"):
        module.train(counter_args(module, tmp_path / "run", minibatch_size=16, learning_rate=0.0))
    with pytest.raises(module.BadArgument, match="--resume takes no other flag"):
        module.train(module.Args(resume=str(tmp_path), seed=2))
    with pytest.raises(module.BadArgument, match="no checkpoint to resume from"):
        module.train(module.Args(resume=str(tmp_path)))
    assert not any(tmp_path.iterdir())


def test_train_from_python_interrupted_by_sigterm_and_resumed(tmp_path, monkeypatch, capsys):
    module = load_script("cpg_continuous.py")
    rollouts = []

    def rollout_cut_short(*args):
        rollouts.append(args)
        if len(rollouts) == 2:  # the handler train installed makes SIGTERM a KeyboardInterrupt
            signal.raise_signal(signal.SIGTERM)
        return collect_rollout(*args)

    collect_rollout = module.collect_rollout
    monkeypatch.setattr(module, "collect_rollout", rollout_cut_short)
    handler = signal.getsignal(signal.SIGTERM)
    summary = module.train(counter_args(module, tmp_path / "run", minibatch_size=16))
    assert signal.getsignal(signal.SIGTERM) is handler
    assert summary["status"] == "interrupted" and summary["global_step"] == 32
    assert f"the checkpoint holds global step 32 (the start of iteration 2): continue with --resume {tmp_path / 'run'}" \
        in capsys.readouterr().err
    monkeypatch.setattr(module, "collect_rollout", collect_rollout)
    summary = module.train(module.Args(resume=str(tmp_path / "run")))
    assert summary["status"] == "completed" and summary["global_step"] == 64
