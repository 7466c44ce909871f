"""The three training scripts: data correctness, telemetry, explosions, and bad input."""
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["ppo_continuous.py", "cpg_continuous.py", "vpg_continuous.py"]
TINY = ["--policy-hidden", "8", "--value-hidden", "8"]
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
# the paper's central experiment (Appendix A.2): the mean shifted far outside Humanoid's action box
SHIFTED_HUMANOID = ["--env-id", "Humanoid-v4", "--mean-shift", "100", "--policy-hidden", "1024", "1024"]


def load_script(name):
    spec = importlib.util.spec_from_file_location(name[:-3], ROOT / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(script, *args, cwd=ROOT, timeout=300, script_dir=ROOT):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, str(Path(script_dir) / script), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def summary_of(run_dir):
    return json.loads((Path(run_dir) / "summary.json").read_text())


def scalars_of(run_dir):
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.fixture(scope="module", params=SCRIPTS)
def script(request):
    return request.param


def test_gae_hand_computed():
    module = load_script("ppo_continuous.py")
    # three steps of one env: the second ends by truncation (bootstrap from its final observation,
    # value 2.0), the third by termination (no bootstrap)
    rewards = np.array([[1.0], [1.0], [1.0]])
    values = np.array([[0.5], [0.5], [0.5]])
    next_values = np.array([[0.5], [2.0], [0.5]])
    terminations = np.array([[0.0], [0.0], [1.0]])
    episode_ends = np.array([[0.0], [1.0], [1.0]])
    advantages, returns = module.compute_gae(rewards, values, next_values, terminations, episode_ends, 0.5, 0.5)
    # t=2: 1 - 0.5; t=1: 1 + 0.5 * 2.0 - 0.5 (no accumulation across the end); t=0: 0.75 + 0.25 * 1.5
    np.testing.assert_allclose(advantages[:, 0], [1.125, 1.5, 0.5])
    np.testing.assert_allclose(returns[:, 0], [1.625, 2.0, 1.0])


def test_rollout_respects_episode_boundaries(script):
    sys.path.insert(0, str(ROOT))
    module = load_script(script)
    args = module.Args(env_id="tests.envs:Counter-v0", num_steps=10, policy_hidden=(8,), value_hidden=(8,),
                       gamma=0.9, gae_lambda=0.8, total_timesteps=10, minibatch_size=10)
    envs = module.make_envs(args, "unused")
    agent = module.Agent(2, envs.single_action_space.low, envs.single_action_space.high, args)
    agent.get_value = lambda obs: obs[..., 0] + 10 * obs[..., 1]  # V(t, episode) = t + 10 * episode
    episodes = []
    next_obs, _ = envs.reset(seed=0)
    batch, rollout, next_obs, step = module.collect_rollout(
        envs, agent, next_obs, args, torch.device("cpu"), 0, lambda *episode: episodes.append(episode))
    envs.close()
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
    result = run(script, "--total-timesteps", 1000, "--num-steps", 500, *TINY, cwd=tmp_path, script_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    summary = summary_of(run_dir)
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
    result = run("ppo_continuous.py", "--fused-loss", *TINY, "--total-timesteps", 1000,
                 cwd=tmp_path, script_dir=tmp_path, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "fused_loss.py" in result.stderr


def test_ppo_explodes_with_a_shifted_mean_and_the_postmortem_replays(tmp_path):
    result = run("ppo_continuous.py", *SHIFTED_HUMANOID, "--total-timesteps", 5000, "--log-dir", tmp_path,
                 "--run-name", "ppo")
    assert result.returncode == 3, result.stderr
    assert "EXPLODED" in result.stdout
    summary = summary_of(tmp_path / "ppo")
    assert summary["status"] == "exploded" and summary["exploded"]
    assert summary["explosion_step"] <= 2000 and summary["nonfinite_updates"] == 1
    postmortem = tmp_path / "ppo" / "postmortem.pt"
    saved = torch.load(postmortem, weights_only=False)
    assert int(saved["stats"]["n_overflow"]) > 0  # the ratio overflowed float32: the paper's mechanism
    loss, grad_norm, stats = load_script("ppo_continuous.py").replay(postmortem)
    assert not (math.isfinite(loss) and math.isfinite(grad_norm))
    torch.testing.assert_close(loss, saved["loss"], equal_nan=True)
    assert int(stats["n_overflow"]) == int(saved["stats"]["n_overflow"])
    assert "stability/max_log10_ratio_raw" in scalars_of(tmp_path / "ppo")


def test_cpg_survives_the_same_shifted_mean(tmp_path):
    result = run("cpg_continuous.py", *SHIFTED_HUMANOID, "--total-timesteps", 3000, "--log-dir", tmp_path,
                 "--run-name", "cpg")
    assert result.returncode == 0, result.stderr
    summary = summary_of(tmp_path / "cpg")
    assert summary["status"] == "completed" and summary["global_step"] == 3000
    assert summary["nonfinite_updates"] == 0
    assert not (tmp_path / "cpg" / "postmortem.pt").exists()


def test_skip_mode_counts_and_goes_on(tmp_path):
    result = run("ppo_continuous.py", *SHIFTED_HUMANOID, "--total-timesteps", 2000, "--on-nonfinite", "skip",
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
    (["--clip-coef", "0"], "--clip-coef"),
    (["--min-std", "1", "--init-std", "0.5"], "--init-std"),
    (["--total-timesteps", "10"], "smaller than one rollout"),
    pytest.param(["--cuda"], "no CUDA GPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")),
])
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path):
    result = run("ppo_continuous.py", *args, "--log-dir", tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir())  # nothing started


def test_bad_input_in_cpg_and_vpg_too(tmp_path):
    for script in ["cpg_continuous.py", "vpg_continuous.py"]:
        result = run(script, "--env-id", "CartPole-v1", "--log-dir", tmp_path)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1


def test_nonfinite_environment_is_not_an_explosion(tmp_path):
    result = run("ppo_continuous.py", "--env-id", "tests.envs:NonFinite-v0", *TINY, "--num-steps", 50,
                 "--total-timesteps", 100, "--minibatch-size", 10, "--log-dir", tmp_path, "--run-name", "nan")
    assert result.returncode == 1
    assert "non-finite observation" in result.stderr and "Traceback" not in result.stderr
    summary = summary_of(tmp_path / "nan")
    assert summary["status"] == "error" and not summary["exploded"] and "non-finite" in summary["error"]


def test_interrupt_leaves_summary_and_logs(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "ppo_continuous.py"), *TINY, "--num-steps", "200", "--minibatch-size", "50",
         "--log-dir", str(tmp_path), "--run-name", "int"], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    for line in process.stdout:
        if line.startswith("iteration 2/"):
            break
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) == 130
    summary = summary_of(tmp_path / "int")
    assert summary["status"] == "interrupted" and summary["global_step"] >= 400
    assert len(scalars_of(tmp_path / "int")["stability/max_log10_ratio"]) >= 2
