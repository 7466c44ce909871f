"""--squash tanh: the squashed density, actions inside the box, training, and what it rejects."""
import math
import sys

import numpy as np
import pytest
import torch
from torch.distributions import AffineTransform, Normal, TanhTransform, TransformedDistribution

from tests.helpers import ROOT, SCRIPTS, STAGGERED, TINY, cli_in_process, completed_run, load_script

# the box of tests.envs:LopsidedCounter-v0, whose upper edge low + (high - low) / 2 * 2 overshoots in float32
LOW, HIGH = np.array([-0.4, -2.0], dtype=np.float32), np.array([0.7, 3.0], dtype=np.float32)


@pytest.mark.parametrize("script", SCRIPTS)
def test_log_prob_is_the_squashed_density(script):
    module = load_script(script)
    agent = module.Agent(3, LOW, HIGH, module.Args(squash="tanh", policy_hidden=(8,), value_hidden=(8,)))
    # pre-squash samples u: inside the box's middle, where float32's tanh(u) rounds to +-1 (|u| > 9, the
    # naive log(1 - tanh(u)^2) is -inf there), and where float64's does too (|u| > 19)
    u = torch.tensor([[0.0, 0.3], [-1.5, 2.5], [5.0, -6.0], [9.5, -12.0], [25.0, -40.0], [100.0, -300.0]])
    mean, std = torch.tensor([0.5, -1.0]), torch.tensor([0.7, 2.0])
    ours = agent.log_prob(u, mean, std)
    # torch's own, in float64, at the action taken: it inverts the tanh, so is finite only while
    # float64's tanh(u) is not +-1
    low, half = torch.tensor(LOW, dtype=torch.float64), torch.tensor((HIGH - LOW) / 2, dtype=torch.float64)
    squashed = TransformedDistribution(Normal(mean.double(), std.double()),
                                       [TanhTransform(), AffineTransform(low + half, half)])
    expected = squashed.log_prob(low + half * (1 + u.double().tanh())).sum(-1)
    assert expected.isfinite().tolist() == [True] * 4 + [False] * 2
    torch.testing.assert_close(ours[:4].double(), expected[:4], rtol=1e-6, atol=1e-4)
    assert ours.isfinite().all()


def step_recorder(envs, sent):
    """Make envs.step keep a copy of every action it is given."""
    step = envs.step

    def recording_step(action):
        sent.append(action.copy())
        return step(action)

    envs.step = recording_step


@pytest.mark.parametrize("squash", ["none", "tanh"])
@pytest.mark.parametrize("mean_shift", [0.0, 1e4, -1e4])
def test_actions_sent_to_the_env_stay_in_the_box(squash, mean_shift):
    sys.path.insert(0, str(ROOT))
    module = load_script("ppo_continuous.py")
    args = module.Args(env_id="tests.envs:LopsidedCounter-v0", squash=squash, mean_shift=mean_shift, num_envs=2,
                       num_steps=100, policy_hidden=(8,), value_hidden=(8,), total_timesteps=200, minibatch_size=200)
    envs = module.make_envs(args, "unused")
    sent = []
    step_recorder(envs, sent)
    agent = module.Agent(2, LOW, HIGH, args)
    next_obs, _ = envs.reset(seed=0)
    policy_mean = module.make_policy_mean(agent, 2, 2, torch.device("cpu"), graphed=False)
    batch, *_ = module.collect_rollout(envs, agent, policy_mean, next_obs, args, torch.device("cpu"), 0,
                                       lambda *episode: None)
    envs.close()
    sent = np.stack(sent)
    assert ((LOW <= sent) & (sent <= HIGH)).all()
    if mean_shift:  # every action on the edge the mean is beyond
        assert (sent == (HIGH if mean_shift > 0 else LOW)).all()
    assert batch["logprobs"].isfinite().all()


@pytest.mark.parametrize("script", ["ppo_continuous.py", "cpg_continuous.py"])
def test_squashed_training_logs_the_squashed_log_prob(script, tmp_path):
    scalars = completed_run(script, *STAGGERED, "--squash", "tanh", "--mean-shift", 20, run_dir=tmp_path / "run")
    # the first rollout's u = 20 + z, z ~ N(0, 1): log N(z) is in (-0.92 - 12.5, -0.92] for |z| < 5, and
    # -log(d action / du) = 2 (u - log 2 + softplus(-2u)) in (28.6, 48.6); the Gaussian's alone is below -0.9
    assert 15 < scalars["stability/min_old_log_prob"][0] < 48
    assert scalars["stability/max_abs_mean"][0] == pytest.approx(20, abs=0.1)  # of the pre-squash mean


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("args", [["--mean-transform", "clip"], ["--logprob-at", "raw"]])
def test_squash_rejects_what_it_makes_meaningless(script, args, tmp_path):
    code, stderr = cli_in_process(script, *TINY, "--total-timesteps", 1000, "--squash", "tanh", *args, "--log-dir", tmp_path)
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and args[0] in lines[0]
    assert not any(tmp_path.iterdir())
