# CPG, the clipped policy gradient in log-space (Eq. 15), for continuous control (CleanRL style),
# with the numerical-stability telemetry of
# "Numerical pitfalls in policy gradient updates". Defaults are that paper's (Tables 3, 4, App. A.3).
# Usage: python cpg_continuous.py --env-id Hopper-v4 --policy-hidden 1024
#    or: from cpg_continuous import Args, train; summary = train(Args(env_id="Hopper-v4"))
# The algorithm comes first, down to train(); below the divider, the machinery that makes a run safe to
# cut and its explosions explainable (epoch guard, CUDA graphs, run record, checkpoint/resume, main).
import contextlib
import copy
import dataclasses
import errno
import json
import math
import os
import pickle
import platform
import random
import signal
import sys
import threading
import time
import traceback
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Optional

try:
    import fcntl
except ImportError:  # not POSIX: runs go without the run folder's lock
    fcntl = None

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import tyro
from torch.utils.tensorboard import SummaryWriter

ALGO = "cpg"
LOG_2PI = math.log(2 * math.pi)
# the evaluation env's seed is the run's plus this, so it never shares a start state sequence with training
EVAL_SEED_OFFSET = 1_000_000
# v4 is deliberate, it is the paper's MuJoCo version: gymnasium's "out of date" warning would come every run
warnings.filterwarnings("ignore", r".*is out of date\. You should consider upgrading", DeprecationWarning)


@dataclass
class Args:
    # Algorithm specific arguments
    env_id: str = "Hopper-v4"
    """the id of the environment (any gymnasium env with a continuous Box action space)"""
    total_timesteps: int = 1000000
    """total timesteps of the experiment"""
    learning_rate: float = 1e-4
    """the learning rate of the optimizer"""
    anneal_lr: bool = False
    """toggle learning rate annealing for policy and value networks"""
    optimizer: Literal["adam", "sgd"] = "adam"
    """the optimizer (the paper's Fig. 7 compares the two)"""
    num_envs: int = 1
    """the number of parallel game environments"""
    num_steps: int = 1000
    """the number of steps to run in each environment per policy rollout (the paper's horizon)"""
    gamma: float = 0.99
    """the discount factor gamma"""
    gae_lambda: float = 0.95
    """the lambda for the general advantage estimation"""
    update_epochs: int = 10
    """the K epochs to update the policy"""
    minibatch_size: int = 64
    """the size of a minibatch"""
    norm_adv: bool = False
    """toggles advantages normalization (per minibatch)"""
    clip_coef: float = 0.2
    """the clipping coefficient epsilon: log-ratios are clipped to [log(1-eps), log(1+eps)]"""
    ent_coef: float = 0.0
    """coefficient of the entropy"""
    vf_coef: float = 0.5
    """coefficient of the value function"""
    max_grad_norm: float = 1.0
    """the maximum norm for the gradient clipping (0 turns clipping off)"""
    target_kl: Optional[float] = None
    """the target KL divergence threshold: stop the epochs of an update once approx_kl exceeds it"""

    # The policy (the paper's Tables 1 and 4, Appendix A.2)
    policy_hidden: tuple[int, ...] = (1024, 1024)
    """the widths of the mean network's hidden layers (the paper's Hopper policy is 1024)"""
    value_hidden: tuple[int, ...] = (64, 64)
    """the widths of the value network's hidden layers"""
    activation: Literal["tanh", "relu"] = "tanh"
    """the activation of both networks"""
    std_param: Literal["softplus", "exp"] = "softplus"
    """softplus: std = softplus(s) + min_std; exp: std = exp(s), floored at min_std when > 0"""
    min_std: float = 0.1
    """the lower bound of the policy's standard deviation"""
    init_std: float = 1.0
    """the policy's initial standard deviation"""
    mean_transform: Literal["none", "clip", "tanh"] = "none"
    """g(mu) that maps the mean into the action box (Table 1)"""
    mean_shift: float = 0.0
    """a constant c added to the mean network's output (Appendix A.2)"""
    logprob_at: Literal["clipped", "raw"] = "clipped"
    """clipped: store the clipped action phi(a) and its log-prob (paper); raw: the unclipped sample.
    With --squash tanh nothing is clipped and only `clipped` is accepted: see --squash"""
    squash: Literal["none", "tanh"] = "none"
    """none: a Gaussian, its samples clipped to the action box; tanh: the action is
    low + (high - low) / 2 * (1 + tanh(u)), u ~ N(mu, std), always inside the box, its log-prob with the
    Jacobian of the tanh and the scaling (SAC). The pre-squash sample u is stored and log-probs are taken
    from it (atanh of an action at the box's edge is not finite). mu is the pre-squash mean, so
    --mean-transform clip/tanh make no sense with it; --mean-shift shifts mu. Telemetry: max_abs_mean and
    frac_mean_outside are of mu, log10_kl is the KL of the Gaussians in u (equal to the squashed ones'),
    min_old_log_prob is of the squashed density; the entropy (bonus and log) is the Gaussian's in u"""

    # Rewards and observations
    reward_scale: float = 1.0
    """rewards are multiplied by this before learning (Table 6)"""
    norm_obs: bool = False
    """normalise observations with running statistics (and clip them to [-10, 10])"""
    norm_reward: bool = False
    """normalise rewards by a running estimate of the return's std (and clip them to [-10, 10])"""

    # Numerics and explosions
    fused_loss: bool = False
    """compute the surrogate with `fused_loss.surrogate` (needs fused_loss.py beside this script)"""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """on a non-finite loss, gradient or parameter: stop the run (postmortem) or skip the step"""

    # Evaluation
    eval_every: int = 0
    """evaluate the deterministic policy every this many steps and at the end (0: never)"""
    eval_episodes: int = 10
    """episodes per evaluation, on an env of its own (seed: --seed + 1000000, the same at every evaluation);
    the action is the policy's mean (after --mean-transform or --squash) clipped to the box. Logged as
    eval/episodic_return; training is bit-identical with or without it"""

    # Experiment, hardware and logging (as CleanRL)
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = False
    """train on the GPU (an error if there is none); CUDA's start-up and the graphs' capture are left out of SPS"""
    cuda_graphs: bool = True
    """with --cuda: replay each minibatch's gradient step and each env step's policy mean as CUDA graphs
    (--no-cuda-graphs: plain eager CUDA, to debug or compare)"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases"""
    wandb_project_name: str = "stable-pg"
    """the wandb's project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of wandb's project"""
    capture_video: bool = False
    """whether to capture videos of the agent performances (check out `videos` folder)"""
    save_model: bool = False
    """whether to save the final model into the run folder as `model.pt`"""
    log_dir: str = "runs"
    """the folder that holds one sub-folder per run"""
    run_name: Optional[str] = None
    """the run's folder name; default `{env_id}__{exp_name}__{seed}__{unix_time}`"""
    resume: Optional[str] = None
    """a run folder: continue that run from its checkpoint.pt, with its own args (no other flag may be
    given), in the same folder; TensorBoard events logged after the checkpoint are purged. On CPU the
    result is bit-identical to an uncut run. An env whose state cannot be saved (it does not pickle, and
    is not MuJoCo) starts a new episode on resume instead; --capture-video's recorder restarts its count"""


class BadArgument(Exception):
    """Bad input, found before anything starts: `train` raises it, the command line reports it in one line
    and exits with 2."""


class EnvNonFinite(Exception):
    """The environment, not the algorithm, produced a non-finite observation or reward."""


def check_args(args):
    problems = [
        (args.total_timesteps < 1, "--total-timesteps must be positive"),
        (args.num_envs < 1 or args.num_steps < 1, "--num-envs and --num-steps must be positive"),
        (args.minibatch_size < 1, "--minibatch-size must be positive"),
        (args.minibatch_size > args.num_envs * args.num_steps,
         f"--minibatch-size {args.minibatch_size} is larger than the rollout "
         f"(num_envs x num_steps = {args.num_envs * args.num_steps})"),
        (args.total_timesteps < args.num_envs * args.num_steps,
         f"--total-timesteps {args.total_timesteps} is smaller than one rollout ({args.num_envs * args.num_steps})"),
        (not (math.isfinite(args.learning_rate) and args.learning_rate > 0), "--learning-rate must be positive"),
        (not (0 < args.clip_coef < 1), "--clip-coef must be in (0, 1)"),
        (not (0 <= args.gamma <= 1 and 0 <= args.gae_lambda <= 1), "--gamma and --gae-lambda must be in [0, 1]"),
        (args.update_epochs < 1, "--update-epochs must be positive"),
        (min(args.ent_coef, args.vf_coef, args.max_grad_norm) < 0,
         "--ent-coef, --vf-coef and --max-grad-norm must be non-negative"),
        (args.target_kl is not None and not args.target_kl > 0, "--target-kl must be positive"),
        (any(w < 1 for w in args.policy_hidden + args.value_hidden), "layer widths must be positive"),
        (not (math.isfinite(args.min_std) and args.min_std >= 0), "--min-std must be non-negative"),
        (not (math.isfinite(args.init_std) and args.init_std > 0), "--init-std must be positive"),
        (args.std_param == "softplus" and args.init_std <= args.min_std,
         "--init-std must exceed --min-std with --std-param softplus"),
        (not math.isfinite(args.mean_shift), "--mean-shift must be finite"),
        (not (math.isfinite(args.reward_scale) and args.reward_scale > 0), "--reward-scale must be positive"),
        (args.squash == "tanh" and args.mean_transform != "none",
         "--mean-transform maps the mean into the action box; with --squash tanh the mean is pre-squash"),
        (args.eval_every < 0, "--eval-every must be non-negative (0: no evaluation)"),
        (args.eval_episodes < 1, "--eval-episodes must be positive"),
        (args.squash == "tanh" and args.logprob_at == "raw",
         "--logprob-at raw: with --squash tanh nothing is clipped, the pre-squash sample is always stored"),
    ]
    for failed, message in problems:
        if failed:
            raise BadArgument(message)
    if args.cuda and not torch.cuda.is_available():
        raise BadArgument("--cuda was given but no CUDA GPU is available")
    if args.track:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise BadArgument("--track needs wandb: pip install wandb")


def make_env(env_id, idx, capture_video, run_dir, gamma, norm_obs, norm_reward):
    def thunk():
        if capture_video and idx == 0:
            env = gym.make(env_id, render_mode="rgb_array")
            env = gym.wrappers.RecordVideo(env, f"{run_dir}/videos")
        else:
            env = gym.make(env_id)
        if not (isinstance(env.observation_space, gym.spaces.Box) and len(env.observation_space.shape) == 1):
            env = gym.wrappers.FlattenObservation(env)
        # innermost, so logged returns are the raw environment returns
        env = gym.wrappers.RecordEpisodeStatistics(env)
        if norm_obs:
            env = gym.wrappers.NormalizeObservation(env)
            env = gym.wrappers.TransformObservation(env, lambda obs: np.clip(obs, -10, 10), env.observation_space)
        if norm_reward:
            env = gym.wrappers.NormalizeReward(env, gamma=gamma)
            env = gym.wrappers.TransformReward(env, lambda reward: np.clip(reward, -10, 10))
        return env

    return thunk


def make_envs(args, run_dir):
    try:
        # SAME_STEP autoreset hands back the true final observation of each episode, so no
        # transition crosses an episode boundary (gymnasium 1.x's default would add a junk one)
        envs = gym.vector.SyncVectorEnv(
            [make_env(args.env_id, i, args.capture_video, run_dir, args.gamma, args.norm_obs, args.norm_reward)
             for i in range(args.num_envs)],
            autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
            copy=False,
        )
    except Exception as e:
        raise BadArgument(f"cannot make env {args.env_id!r}: {first_line(e)}")
    space = envs.single_action_space
    if not isinstance(space, gym.spaces.Box):
        envs.close()
        raise BadArgument(f"{args.env_id} has a {type(space).__name__} action space; a continuous Box is required")
    if not (np.isfinite(space.low).all() and np.isfinite(space.high).all()):
        envs.close()
        raise BadArgument(f"{args.env_id} has an unbounded action space; actions are clipped to a finite box")
    return envs


def make_eval_env(args, run_dir):
    """The evaluation's own env: training never steps it, so evaluating cannot change training. With
    --norm-obs it normalises with the training env's statistics, frozen (see evaluate)."""
    return make_env(args.env_id, 0, False, run_dir, args.gamma, args.norm_obs, False)()


def first_line(error):
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def layer_init(layer, std=np.sqrt(2), bias_const=0.0):
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


def mlp(sizes, activation, out_std):
    layers = []
    for fan_in, fan_out in zip(sizes[:-2], sizes[1:-1]):
        layers += [layer_init(nn.Linear(fan_in, fan_out)), activation()]
    layers.append(layer_init(nn.Linear(sizes[-2], sizes[-1]), std=out_std))
    return nn.Sequential(*layers)


class Agent(nn.Module):
    def __init__(self, obs_dim, action_low, action_high, args):
        super().__init__()
        activation = {"tanh": nn.Tanh, "relu": nn.ReLU}[args.activation]
        act_dim = len(action_low)
        self.critic = mlp([obs_dim, *args.value_hidden, 1], activation, out_std=1.0)
        self.actor_mean = mlp([obs_dim, *args.policy_hidden, act_dim], activation, out_std=0.01)
        if args.std_param == "softplus":
            init = math.log(math.expm1(args.init_std - args.min_std))
        else:
            init = math.log(args.init_std)
        self.actor_std_param = nn.Parameter(torch.full((act_dim,), init))
        low = torch.as_tensor(action_low, dtype=torch.float32)
        high = torch.as_tensor(action_high, dtype=torch.float32)
        self.register_buffer("action_low", low)
        self.register_buffer("action_high", high)
        self.mean_shift, self.mean_transform = args.mean_shift, args.mean_transform
        self.std_param, self.min_std, self.squash = args.std_param, args.min_std, args.squash

    def get_value(self, obs):
        return self.critic(obs).squeeze(-1)

    def mean(self, obs):
        return self.transform_mean(self.actor_mean(obs))

    def transform_mean(self, mean):
        """The mean network's output, shifted and mapped into the action box as configured."""
        if self.mean_shift:
            mean = mean + self.mean_shift
        if self.mean_transform == "clip":
            return torch.maximum(torch.minimum(mean, self.action_high), self.action_low)
        if self.mean_transform == "tanh":
            return squash_into_box(mean, self.action_low, self.action_high)
        return mean

    def std(self):
        if self.std_param == "softplus":
            return nn.functional.softplus(self.actor_std_param) + self.min_std
        std = self.actor_std_param.exp()
        return std.clamp(min=self.min_std) if self.min_std > 0 else std

    def log_prob(self, actions, mean, std):
        """log pi of stored actions. With --squash tanh they are pre-squash samples u, and this is the
        density of the action squash_into_box(u) that was taken."""
        log_prob = gaussian_log_prob(actions, mean, std)
        if self.squash == "tanh":
            log_prob = log_prob - squash_log_det(actions, self.action_low, self.action_high)
        return log_prob


def squash_into_box(u, low, high):
    """low + (high - low) / 2 * (1 + tanh(u)): u mapped into the box [low, high], numpy or torch alike."""
    tanh = torch.tanh if torch.is_tensor(u) else np.tanh
    return low + (high - low) / 2 * (1 + tanh(u))


def squash_log_det(u, low, high):
    """log |d squash_into_box(u) / du|, summed over dims; SAC's form of log(1 - tanh(u)^2), finite where tanh(u)
    rounds to +-1."""
    return (2 * (math.log(2) - u - nn.functional.softplus(-2 * u)) + ((high - low) / 2).log()).sum(-1)


def gaussian_log_prob(actions, mean, std):
    return (-0.5 * ((actions - mean) / std) ** 2 - std.log() - 0.5 * LOG_2PI).sum(-1)


def gaussian_kl(mean, std, old_mean, old_std):
    """Closed-form KL(N(mean, std) || N(old_mean, old_std)) of diagonal Gaussians, summed over dims. Between
    updates the two are close, and the textbook form's log(old_std / std) + std^2 / (2 old_std^2) - 1/2
    cancels to nothing in float32; in w = 2 log(std / old_std) the std term is (e^w - 1 - w) / 2, taken from
    its Taylor series where w is small."""
    w = 2 * torch.log1p((std - old_std) / old_std)
    series = torch.ones_like(w)
    for k in range(18, 2, -1):  # e^w - 1 - w = w^2 / 2 (1 + w / 3 (1 + w / 4 (...))), float64-exact for |w| < 1/2
        series = 1 + w / k * series
    std_term = torch.where(w.abs() < 0.5, w * w / 2 * series, torch.expm1(w) - w)
    return ((mean - old_mean) ** 2 / (2 * old_std**2) + std_term / 2).sum(-1)


def compute_gae(rewards, values, next_values, terminations, episode_ends, gamma, gae_lambda):
    """GAE over [T, num_envs] arrays. next_values[t] is the value of the state that transition t
    reached (an episode's true final observation when it ended); terminations stop the bootstrap,
    any episode end (terminated or truncated) stops the accumulation."""
    advantages = np.zeros_like(rewards)
    for env in range(rewards.shape[1]):
        # python floats: numpy's per-call overhead would dominate this sequential loop
        r, v, nv, term, end = (x[:, env].tolist() for x in (rewards, values, next_values, terminations, episode_ends))
        last, column = 0.0, [0.0] * len(r)
        for t in reversed(range(len(r))):
            delta = r[t] + gamma * nv[t] * (1.0 - term[t]) - v[t]
            last = delta + gamma * gae_lambda * (1.0 - end[t]) * last
            column[t] = last
        advantages[:, env] = column
    return advantages, advantages + values


def surrogate(new_logp, old_logp, advantages, clip_coef, kind="cpg"):
    """The surrogate loss and its diagnostics; equal to fused_loss.surrogate_reference."""
    log_ratio = new_logp - old_logp
    # the ratio itself is never formed in the objective, so it cannot overflow there
    clipped = torch.clamp(log_ratio, math.log(1 - clip_coef), math.log(1 + clip_coef))
    surr = torch.minimum(log_ratio * advantages, clipped * advantages)
    return -surr.mean(), ratio_diagnostics(new_logp, old_logp, advantages, clip_coef, clipped_objective=True)


SURROGATE_STATS = ("max_log_ratio", "min_log_ratio", "max_log_ratio_effective", "clip_frac", "approx_kl",
                   "n_nonfinite", "n_overflow")


@torch.no_grad()
def ratio_diagnostics(new_logp, old_logp, advantages, clip_coef, clipped_objective):
    """The SURROGATE_STATS of a batch, as 0-dim tensors. clipped_objective: the objective clips the ratio on
    the side its advantage gains from, and max_log_ratio_effective is of the ratio it then uses."""
    log_ratio = new_logp.detach() - old_logp
    ratio = log_ratio.exp()
    effective = log_ratio
    if clipped_objective:
        effective = torch.where(advantages >= 0, log_ratio.clamp(max=math.log(1 + clip_coef)),
                                log_ratio.clamp(min=math.log(1 - clip_coef)))
    # x * 0 is NaN exactly where x is inf or NaN: one isnan for the three inputs (isfinite is four kernels each)
    nonfinite = (new_logp.detach() * 0 + old_logp * 0 + advantages * 0).isnan()
    return {
        "max_log_ratio": log_ratio.max(),
        "min_log_ratio": log_ratio.min(),
        "max_log_ratio_effective": effective.max(),
        "clip_frac": ((log_ratio > math.log1p(clip_coef)) | (log_ratio < math.log1p(-clip_coef)))
                     .to(log_ratio.dtype).mean(),
        "approx_kl": ((ratio - 1) - log_ratio).mean(),
        "n_nonfinite": nonfinite.sum(),
        "n_overflow": ((ratio == math.inf) & (log_ratio != math.inf)).sum(),  # exp of a finite log-ratio overflowed
    }


def surrogate_function(args):
    """This file's surrogate, or the fused op's with --fused-loss."""
    if not args.fused_loss:
        return surrogate
    try:
        import fused_loss
    except ImportError as e:
        raise BadArgument(f"--fused-loss needs fused_loss.py beside this script ({e})")
    return fused_loss.surrogate


def collect_rollout(envs, agent, policy_mean, next_obs, args, device, global_step, on_episode):
    """Run num_steps in every env. Only the mean network runs per step; values and log-probs of the
    whole rollout are computed in one batch afterwards, since the networks do not change in between.
    Returns the flattened batch, the rollout as [num_steps, num_envs] arrays (rewards, values,
    next_values, terminations, episode_ends, advantages, returns), the last observation and the step."""
    num_steps, num_envs = args.num_steps, args.num_envs
    # numpy buffers and numpy sampling: per step, torch only runs the mean network (tiny tensor ops
    # cost more in dispatch than in arithmetic)
    obs = np.zeros((num_steps, num_envs, *envs.single_observation_space.shape), dtype=np.float32)
    actions = np.zeros((num_steps, num_envs, *envs.single_action_space.shape), dtype=np.float32)
    old_means = np.zeros_like(actions)
    rewards = np.zeros((num_steps, num_envs), dtype=np.float32)
    terminations = np.zeros((num_steps, num_envs), dtype=np.float32)
    episode_ends = np.zeros((num_steps, num_envs), dtype=np.float32)
    truncations = []  # (step, env, true final observation) of every truncated episode
    with torch.inference_mode():
        std = agent.std()
        scaled_noise = (std * torch.randn(actions.shape, device=device)).cpu().numpy()
        action_low, action_high = envs.single_action_space.low, envs.single_action_space.high
        for step in range(num_steps):
            global_step += num_envs
            obs[step] = next_obs
            mean = policy_mean(obs[step])
            sample = mean + scaled_noise[step]
            if args.squash == "tanh":
                # the clip only catches rounding at the box's edges
                env_action = np.clip(squash_into_box(sample, action_low, action_high), action_low, action_high)
            else:
                env_action = np.clip(sample, action_low, action_high)
            old_means[step] = mean
            actions[step] = env_action if args.logprob_at == "clipped" and args.squash == "none" else sample
            next_obs, reward, terminated, truncated, infos = envs.step(env_action)
            if not (np.isfinite(next_obs).all() and np.isfinite(reward).all()):
                raise EnvNonFinite(f"{args.env_id} returned a non-finite observation or reward "
                                   f"at global step {global_step}; this is not an explosion of the algorithm")
            rewards[step] = reward * args.reward_scale
            terminations[step] = terminated
            episode_ends[step] = terminated | truncated
            if "final_info" in infos:
                for env_idx in np.flatnonzero(infos["_final_info"]):
                    final_obs = infos["final_obs"][env_idx]
                    if not np.isfinite(final_obs).all():
                        raise EnvNonFinite(f"{args.env_id} returned a non-finite final observation "
                                           f"at global step {global_step}")
                    if truncated[env_idx]:
                        truncations.append((step, env_idx, final_obs))
                    episode = infos["final_info"]["episode"]
                    on_episode(global_step, float(episode["r"][env_idx]), int(episode["l"][env_idx]))

        obs, actions, old_means = (torch.as_tensor(x, device=device) for x in (obs, actions, old_means))
        values = agent.get_value(obs).cpu().numpy()
        next_values = np.empty_like(values)
        next_values[:-1] = values[1:]
        next_values[-1] = agent.get_value(torch.as_tensor(next_obs, dtype=torch.float32, device=device)).cpu()
        # an episode's last transition bootstraps from its true final observation, not the reset one
        if truncations:
            at_steps, in_envs, final_observations = zip(*truncations)
            final_observations = torch.as_tensor(np.stack(final_observations), dtype=torch.float32, device=device)
            next_values[list(at_steps), list(in_envs)] = agent.get_value(final_observations).cpu().numpy()
        advantages, returns = compute_gae(rewards, values, next_values, terminations, episode_ends,
                                          args.gamma, args.gae_lambda)
        logprobs = agent.log_prob(actions, old_means, std)

    batch_size = num_steps * num_envs
    batch = {
        "obs": obs.reshape(batch_size, -1),
        "actions": actions.reshape(batch_size, -1),
        "logprobs": logprobs.reshape(batch_size),
        "advantages": torch.as_tensor(advantages, device=device).reshape(batch_size),
        "returns": torch.as_tensor(returns, device=device).reshape(batch_size),
        "old_means": old_means.reshape(batch_size, -1),
        "old_std": std.expand(batch_size, -1),
    }
    rollout = {"rewards": rewards, "values": values, "next_values": next_values, "terminations": terminations,
               "episode_ends": episode_ends, "advantages": advantages, "returns": returns}
    return batch, rollout, next_obs, global_step


def deterministic_action(mean, action_low, action_high, squash):
    """The action of the policy's mean: squashed into the box with --squash tanh, then clipped to it."""
    if squash == "tanh":
        mean = squash_into_box(mean, action_low, action_high)
    return np.clip(mean, action_low, action_high)


def evaluate(agent, eval_env, train_env, args, device):
    """Mean raw return of args.eval_episodes episodes of the deterministic policy. The env is reseeded at
    every evaluation, so each one starts from the same states; nothing here draws from training's RNGs."""
    if args.norm_obs:
        normaliser = obs_normaliser(eval_env)
        normaliser.obs_rms, normaliser.update_running_mean = copy.deepcopy(obs_normaliser(train_env).obs_rms), False
    low, high = eval_env.action_space.low, eval_env.action_space.high
    returns = []
    obs, _ = eval_env.reset(seed=args.seed + EVAL_SEED_OFFSET)
    for episode in range(args.eval_episodes):
        if episode:
            obs, _ = eval_env.reset()
        episode_return, done = 0.0, False
        while not done:
            with torch.inference_mode():
                mean = agent.mean(torch.as_tensor(obs, dtype=torch.float32, device=device)[None])[0].cpu().numpy()
            obs, reward, terminated, truncated, _ = eval_env.step(deterministic_action(mean, low, high, args.squash))
            episode_return += float(reward)
            done = terminated or truncated
        returns.append(episode_return)
    return float(np.mean(returns))


def minibatch_loss(agent, mb, args, surrogate_fn):
    """All losses of one minibatch; the training loop and a postmortem replay both use it."""
    mean = agent.mean(mb["obs"])
    std = agent.std()
    new_logp = agent.log_prob(mb["actions"], mean, std)
    advantages = mb["advantages"]
    if args.norm_adv:
        advantages = (advantages - advantages.mean()) / (advantages.std(correction=0) + 1e-8)
    pg_loss, stats = surrogate_fn(new_logp, mb["logprobs"], advantages, args.clip_coef, "cpg")
    # the policy's std is state-independent, so its entropy is the same for every state
    entropy = std.log().sum() + 0.5 * len(std) * (1 + LOG_2PI)
    v_loss = 0.5 * ((agent.get_value(mb["obs"]) - mb["returns"]) ** 2).mean()
    loss = pg_loss + args.vf_coef * v_loss
    if args.ent_coef:
        loss = loss - args.ent_coef * entropy
    return loss, pg_loss, v_loss, entropy, stats


# what one minibatch step hands back, as one tensor: read from the device once per epoch, not per step
STEP_RECORD = ("loss", "pg_loss", "v_loss", "entropy", "grad_norm", "nonfinite", *SURROGATE_STATS)


def recorded(step_records, name):
    """One field of a STEP_RECORD tensor, or of a stack of them."""
    return step_records[..., STEP_RECORD.index(name)]


def make_optimizer(params, args):
    if args.optimizer == "adam":
        return torch.optim.Adam(params, lr=args.learning_rate, eps=1e-5, fused=True)
    return torch.optim.SGD(params, lr=args.learning_rate, fused=True)


def gradient_step(agent, optimizer, mb, args, surrogate_fn, keep_grads=False):
    """Zero the gradients, the loss, backward, clip: the step's STEP_RECORD. Nothing here waits for the
    device; whether the step is finite stays a device tensor for optimizer_step. keep_grads: zero the
    gradients in place, as CUDA graphs need (else backward's own allocation costs less)."""
    optimizer.zero_grad(set_to_none=not keep_grads)
    loss, pg_loss, v_loss, entropy, stats = minibatch_loss(agent, mb, args, surrogate_fn)
    loss.backward()
    params = list(agent.parameters())
    grad_norm = nn.utils.clip_grad_norm_(params, args.max_grad_norm if args.max_grad_norm > 0 else math.inf)
    with torch.no_grad():
        # x * 0 is NaN exactly where x is inf or NaN, as in ratio_diagnostics
        nonfinite = (loss * 0 + grad_norm * 0).isnan()
        # all float32 before the stack: mixed dtypes would cost a copy kernel per field instead of one
        fields = [loss, pg_loss, v_loss, entropy, grad_norm, nonfinite, *(stats[key] for key in SURROGATE_STATS)]
        return torch.stack([field.float() for field in fields])


def optimizer_step(optimizer, step_record):
    # fused Adam and SGD skip the step on the device when found_inf is 1, as under AMP's GradScaler
    optimizer.found_inf = recorded(step_record, "nonfinite")
    optimizer.step()


@dataclass
class Explosion:
    """The first non-finite minibatch step of a run, and why."""
    reason: str
    minibatch: dict
    step_record: torch.Tensor
    epoch: int


def shuffled_minibatches(batch, minibatch_size):
    # one gather per epoch: the minibatches are then views of the shuffled batch
    batch_size = len(batch["obs"])
    permutation = torch.randperm(batch_size, device=batch["obs"].device)
    shuffled = {key: value[permutation] for key, value in batch.items()}
    return [{key: value[start: start + minibatch_size] for key, value in shuffled.items()}
            for start in range(0, batch_size, minibatch_size)]


def update(agent, optimizer, batch, args, compute_step, guard):
    """The iteration's epochs of minibatch steps: (their STEP_RECORDs stacked, how many were non-finite, the
    Explosion or None). The epochs stop early at --target-kl, and at an explosion."""
    records = []
    for epoch in range(args.update_epochs):
        minibatches = shuffled_minibatches(batch, args.minibatch_size)
        guard.snapshot()
        epoch_records = []
        for mb in minibatches:
            epoch_records.append(compute_step(mb))
            optimizer_step(optimizer, epoch_records[-1])
        epoch_records, explosion = guard.check(torch.stack(epoch_records), minibatches, epoch)
        records.append(epoch_records)
        last_step = minibatches[-1], epoch_records[-1], epoch
        if explosion or (args.target_kl is not None and recorded(epoch_records[-1], "approx_kl") > args.target_kl):
            break
    step_records = torch.cat(records)
    nonfinite = int(recorded(step_records, "nonfinite").sum())
    # a step that makes a parameter non-finite shows in the next minibatch's loss; this catches the
    # last step, and stops even in skip mode, since nothing can be learned from there on
    if not explosion and not torch.isfinite(nn.utils.get_total_norm(list(agent.parameters()))):
        nonfinite += 1
        explosion = Explosion("non-finite parameter", *last_step)
    return step_records, nonfinite, explosion


def train(args):
    """Train one run to its end: returns its summary (also in summary.json), whose status says how it ended:
    completed, exploded, interrupted (Ctrl-C or SIGTERM; continue it with Args(resume=its folder)) or error.
    Bad input raises BadArgument before anything starts, and so does a run folder that a live run holds (one
    writer per folder, see hold_run_folder). A file that cannot be written (a full disk) raises nothing: the run
    ends with status error, its summary's `error` names the file and the cause, what was written before stays
    (checkpoint.pt the last good one), and one line on stderr says how to resume. The signal handlers are left as
    they were found.
    The summary's sps (and charts/SPS) times training alone. Start-up, all train() does before its first env
    step (envs, networks, optimizer state, and warm_up: CUDA and cuBLAS start, graphs captured, the fused op
    loaded), is left out: startup_s and startup_cpu_s, its part of wall_time_s and cpu_time_s."""
    args, checkpoint, run_dir, run_name = resolve_run(args)
    check_args(args)
    surrogate_fn = surrogate_function(args)
    envs, eval_env, lock = envs_and_run_folder(args, run_dir)
    batch_size = args.num_envs * args.num_steps
    num_iterations = args.total_timesteps // batch_size
    run = RunRecord(args, run_dir, run_name, num_iterations * batch_size, checkpoint)

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if args.cuda else "cpu")
    obs_dim = envs.single_observation_space.shape[0]
    agent = Agent(obs_dim, envs.single_action_space.low, envs.single_action_space.high, args).to(device)
    # the mean network at initialisation, for the distance the policy has travelled (Fig. 7b,c); a
    # resumed run gets it from the seed, as the run it continues did
    initial_actor_mean = copy.deepcopy(agent.actor_mean).requires_grad_(False)
    params = list(agent.parameters())
    optimizer = make_optimizer(params, args)
    if checkpoint:
        agent.load_state_dict(checkpoint["agent"])
        optimizer.load_state_dict(checkpoint["optimizer"])
    state_tensors = prime_optimizer(optimizer, params)
    graphed = device.type == "cuda" and args.cuda_graphs
    compute_step = make_compute_step(agent, optimizer, args, surrogate_fn, graphed)
    guard = EpochGuard(state_tensors, params, optimizer, compute_step, enabled=args.on_nonfinite == "stop")
    policy_mean = make_policy_mean(agent, args.num_envs, obs_dim, device, graphed)
    checkpoints = Checkpoints(run_dir, checkpoint, args, run, agent, optimizer, envs, device)

    first_iteration, global_step = (checkpoint["iteration"], checkpoint["global_step"]) if checkpoint else (1, 0)
    with sigterm_interrupts(), quiet_event_thread():
        try:
            run.start()
            warm_up(compute_step, policy_mean, agent, args)
            next_obs, _ = envs.reset(seed=args.seed)
            if checkpoint:
                next_obs = restore_env_state(envs, checkpoint["envs"], checkpoint["next_obs"])
                set_rng_state(checkpoint["rng"], device)
            run.training_started()
            for iteration in range(first_iteration, num_iterations + 1):
                checkpoints.boundary(iteration, global_step, next_obs)
                if args.anneal_lr:
                    optimizer.param_groups[0]["lr"] = (1.0 - (iteration - 1.0) / num_iterations) * args.learning_rate
                batch, rollout, next_obs, global_step = collect_rollout(
                    envs, agent, policy_mean, next_obs, args, device, global_step, run.on_episode)
                step_records, nonfinite, explosion = update(agent, optimizer, batch, args, compute_step, guard)
                telemetry = iteration_telemetry(agent, initial_actor_mean, batch, rollout, step_records)
                telemetry = run.log_iteration(global_step, nonfinite, optimizer.param_groups[0]["lr"], telemetry)
                if explosion:
                    run.exploded(explosion, telemetry, global_step, iteration, agent, optimizer)
                    break
                if args.eval_every and global_step // args.eval_every > (global_step - batch_size) // args.eval_every:
                    run.log_evaluation(evaluate(agent, eval_env, envs.envs[0], args, device), global_step)
                run.iteration_done(iteration, num_iterations, global_step, telemetry)
            else:
                if args.eval_every and run.summary["eval_step"] != global_step:
                    run.log_evaluation(evaluate(agent, eval_env, envs.envs[0], args, device), global_step)
                if args.save_model:
                    save_model(run_dir, agent, args)
                run.completed(global_step)
            checkpoints.remove()  # a completed or exploded run has nothing left to resume
        except KeyboardInterrupt:
            run.interrupted(global_step, checkpoints)
        except Exception as e:
            run.failed(e, global_step, checkpoints)
        finally:
            close_all(run, envs, eval_env, lock)
    return run.summary


# =========================================================================================================
# The machinery: everything below makes a run safe to cut and its explosions explainable, and changes no
# result. Epoch guard, CUDA graphs, run record, checkpoint/resume, and the command line.
# =========================================================================================================


def copy_tensors(destinations, sources):
    # on CUDA one multi-tensor kernel for the lot (they share a dtype and a device), not a launch per tensor
    with torch.no_grad():
        torch._foreach_copy_(destinations, sources)


def prime_optimizer(optimizer, params):
    """Allocate the gradients and the optimizer state before the first step, and return every tensor of
    the training state: CUDA graphs write to fixed addresses, and an epoch is rolled back by copying in
    place. The step is skipped (found_inf), so Adam's state is what its first real step would create."""
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.found_inf = torch.ones((), device=params[0].device)
    optimizer.step()
    return params + [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]


def nonfinite_reason(loss, params):
    if not all(bool(p.isfinite().all()) for p in params):
        # the previous step made it so: the postmortem holds the networks after that step
        return "non-finite parameter"
    return "non-finite loss" if not torch.isfinite(loss) else "non-finite gradient norm"


class EpochGuard:
    """--on-nonfinite stop: the training state at the start of each epoch. A non-finite step shows in the
    epoch's one read from the device, after the epoch's later steps ran; the epoch is then rolled back and
    redone eagerly up to that step, so the postmortem holds its minibatch and the state before it."""

    def __init__(self, state_tensors, params, optimizer, compute_step, enabled):
        self.state_tensors, self.params, self.optimizer, self.compute_step = state_tensors, params, optimizer, compute_step
        self.enabled = enabled
        self.saved = [t.clone() for t in state_tensors]

    def snapshot(self):
        if self.enabled:
            copy_tensors(self.saved, self.state_tensors)

    def rollback(self):
        copy_tensors(self.state_tensors, self.saved)

    def check(self, epoch_records, minibatches, epoch):
        """(The epoch's STEP_RECORDs, its Explosion or None)."""
        if not (self.enabled and bool(recorded(epoch_records, "nonfinite").any())):
            return epoch_records, None
        self.rollback()
        redone = []
        for mb in minibatches:
            redone.append(self.compute_step(mb, use_graph=False))
            if recorded(redone[-1], "nonfinite"):
                reason = nonfinite_reason(recorded(redone[-1], "loss"), self.params)
                return torch.stack(redone), Explosion(reason, mb, redone[-1], epoch)
            optimizer_step(self.optimizer, redone[-1])
        return torch.stack(redone), None


def capture(fn, *static_args):
    """(graph, static output): fn(*static_args) captured in a CUDA graph; graph.replay() reruns it on what
    the static arguments then hold. Capture needs fn's first-call allocations (autograd's, cuBLAS's) done
    before, on a side stream."""
    side_stream = torch.cuda.Stream()
    side_stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side_stream):
        for _ in range(3):
            fn(*static_args)
    torch.cuda.current_stream().wait_stream(side_stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_output = fn(*static_args)
    return graph, static_output


def make_compute_step(agent, optimizer, args, surrogate_fn, graphed):
    """compute_step(minibatch, use_graph=graphed) -> gradient_step's STEP_RECORD. graphed: the step of each
    minibatch size (1000 in minibatches of 64 leaves a last one of 40) is captured once in a CUDA graph and
    replayed, one launch instead of hundreds, which is what a GPU update of these small networks is bound
    by. The optimizer step stays outside the graph, so the learning rate may change."""
    graphs = {}  # minibatch size -> (static minibatch, graph, static record)

    def eager(mb):
        return gradient_step(agent, optimizer, mb, args, surrogate_fn, keep_grads=graphed)

    def compute_step(mb, use_graph=graphed):
        if not use_graph:
            return eager(mb)
        size = len(mb["obs"])
        if size not in graphs:
            static_mb = {key: value.clone() for key, value in mb.items()}
            graphs[size] = static_mb, *capture(eager, static_mb)
        static_mb, graph, static_record = graphs[size]
        copy_tensors([static_mb[key] for key in mb], list(mb.values()))
        graph.replay()
        return static_record.clone()

    return compute_step


def make_policy_mean(agent, num_envs, obs_dim, device, graphed):
    """policy_mean(observations) -> the policy mean as numpy, once per env step. On CUDA the observations go in
    and the mean comes out through pinned host buffers without blocking, so the host waits once per step, for
    the mean (a copy from pageable memory waits for the device too). graphed: the mean network in between is
    one CUDA-graph replay; eagerly it is a dozen launches."""
    if device.type != "cuda":
        return lambda obs: agent.mean(torch.as_tensor(obs)).numpy()
    static_obs = torch.zeros((num_envs, obs_dim), device=device)
    if graphed:
        with torch.no_grad():
            graph, static_mean = capture(agent.mean, static_obs)

        def device_mean():
            graph.replay()
            return static_mean
    else:
        def device_mean():
            return agent.mean(static_obs)
    host_obs = torch.zeros((num_envs, obs_dim), pin_memory=True)
    host_mean = torch.zeros((num_envs, len(agent.action_low)), pin_memory=True)
    host_obs_array, host_mean_array = host_obs.numpy(), host_mean.numpy()

    def policy_mean(obs):
        host_obs_array[:] = obs  # the last step's copy out of it is done: its mean was waited for
        static_obs.copy_(host_obs, non_blocking=True)
        host_mean.copy_(device_mean(), non_blocking=True)
        torch.cuda.current_stream(device).synchronize()
        return host_mean_array.copy()  # the buffer is the next step's

    return policy_mean


def warm_up(compute_step, policy_mean, agent, args):
    """Start-up's end: a gradient step of each minibatch size and a policy mean, on stand-in inputs, so that what
    the first call does only once (CUDA's and cuBLAS's start-up, capturing the CUDA graphs, loading the fused op)
    is done before training is timed. No result changes: the step is not applied, and the next one zeroes its
    gradients."""
    obs_dim, act_dim, device = agent.critic[0].in_features, len(agent.action_low), agent.action_low.device
    batch_size = args.num_envs * args.num_steps
    for size in sorted({args.minibatch_size, batch_size % args.minibatch_size} - {0}):
        compute_step(stand_in_minibatch(size, obs_dim, act_dim, device))
    with torch.inference_mode():
        policy_mean(np.zeros((args.num_envs, obs_dim), dtype=np.float32))


def stand_in_minibatch(size, obs_dim, act_dim, device):
    """A minibatch with the keys, shapes and dtype of collect_rollout's batch, and values never learned from."""
    shapes = {"obs": (obs_dim,), "actions": (act_dim,), "logprobs": (), "advantages": (), "returns": (),
              "old_means": (act_dim,), "old_std": (act_dim,)}
    return {key: torch.ones((size, *shape), device=device) for key, shape in shapes.items()}


def iteration_telemetry(agent, initial_actor_mean, batch, rollout, step_records):
    """The iteration's stability scalars (the paper's figures) and CleanRL's loss scalars."""
    steps = dict(zip(STEP_RECORD, step_records.T))
    with torch.no_grad():
        raw_means = agent.actor_mean(batch["obs"])
        current_std = agent.std()
        kl = gaussian_kl(agent.transform_mean(raw_means), current_std, batch["old_means"], batch["old_std"]).mean()
        policy_l2 = (raw_means - initial_actor_mean(batch["obs"])).pow(2).mean().sqrt()
        outside = (batch["old_means"] < agent.action_low) | (batch["old_means"] > agent.action_high)
        telemetry = {
            "stability/max_log10_ratio": float(steps["max_log_ratio_effective"].max()) / math.log(10),
            "stability/max_log10_ratio_raw": float(steps["max_log_ratio"].max()) / math.log(10),
            "stability/log10_kl": math.log10(float(kl)) if float(kl) > 0 else -math.inf,
            "stability/min_std": float(current_std.min()),
            "stability/mean_abs_advantage": float(np.abs(rollout["advantages"]).mean()),
            "stability/max_abs_mean": float(batch["old_means"].abs().max()),
            "stability/frac_mean_outside": float(outside.float().mean()),
            "stability/min_old_log_prob": float(batch["logprobs"].min()),
            "stability/grad_norm": float(steps["grad_norm"].max()),
            "stability/policy_l2_from_init": float(policy_l2),
            "losses/approx_kl": float(steps["approx_kl"].mean()),
            "losses/clipfrac": float(steps["clip_frac"].mean()),
        }
        applied = steps["nonfinite"] == 0
        if applied.any():
            returns, values = rollout["returns"], rollout["values"]
            var_y = np.var(returns)
            telemetry["losses/policy_loss"] = float(steps["pg_loss"][applied].mean())
            telemetry["losses/value_loss"] = float(steps["v_loss"][applied].mean())
            telemetry["losses/entropy"] = float(steps["entropy"][applied].mean())
            telemetry["losses/explained_variance"] = np.nan if var_y == 0 else float(1 - np.var(returns - values) / var_y)
    return telemetry


def explosion_message(explosion, telemetry, global_step, iteration, postmortem_path):
    """A short diagnosis: the stability figures at the exploding step (ratios in log10)."""
    step = dict(zip(STEP_RECORD, explosion.step_record.tolist()))
    return (f"EXPLODED at global step {global_step} (iteration {iteration}, epoch {explosion.epoch}): "
            f"{explosion.reason} (loss {step['loss']:.4g}, grad norm {step['grad_norm']:.4g}); "
            f"max log10 ratio {telemetry['stability/max_log10_ratio']:.4g} "
            f"(raw {telemetry['stability/max_log10_ratio_raw']:.4g}), ratio overflows {int(step['n_overflow'])}, "
            f"log10 KL {telemetry['stability/log10_kl']:.3g}, min std {telemetry['stability/min_std']:.3g}, "
            f"max |mean| {telemetry['stability/max_abs_mean']:.4g} "
            f"({100 * telemetry['stability/frac_mean_outside']:.0f}% outside the action box), "
            f"min old log-prob {telemetry['stability/min_old_log_prob']:.4g}. Replay: {postmortem_path}")


class WriteFailed(Exception):
    """A file of the run could not be written (a full disk, a quota, permissions): the run ends with status error,
    and what it wrote before stays."""

    def __init__(self, what, cause):
        super().__init__(f"{cause.strerror.lower() if cause.strerror else cause} writing {what}")
        self.cause = cause

    def once_fixed(self):
        return "once there is space" if self.cause.errno in (errno.ENOSPC, errno.EDQUOT) else "once it can be written"


def os_error(error):
    """The OSError that caused `error`: itself or one in its chain (torch.save raises RuntimeErrors over it)."""
    while error is not None and not isinstance(error, OSError):
        error = error.__cause__ or error.__context__
    return error


@contextlib.contextmanager
def writing(what):
    """Raise a failure to write `what` as WriteFailed."""
    try:
        yield
    except Exception as e:
        cause = os_error(e)
        if cause is None:
            raise
        raise WriteFailed(what, cause) from e


def write_atomically(path, write, durable=False):
    """write(temporary path), then rename it to path: a reader, or a kill, never sees half a file, and a failed
    write leaves the last good one. A failure to write raises WriteFailed, its temporary file removed."""
    tmp = f"{path}.tmp"
    try:
        with writing(path):
            write(tmp)
            if durable:
                fsync_file(tmp)
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def fsync_file(path):
    # A killed process loses nothing it wrote (the data is in the kernel's page cache) and the rename is atomic,
    # so no fsync is needed for a kill. A node that crashes or loses power (a preempted VM) can keep the rename
    # and lose the data, leaving an empty file under the final name: the files written once a minute or once a
    # run, that a resume or a reader of the results needs (checkpoint.pt, model.pt, postmortem.pt, the final
    # summary.json), are fsynced before their rename, a cost nobody measures. summary.json while running and the
    # TensorBoard events are not: they are rewritten every iteration, and a crash costs their latest records.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def torch_save(obj, path):
    # through a Python file: a failed write raises OSError (ENOSPC, ...), and the file is closed before it is removed,
    # which frees its space. torch.save given a path raises a bare "unexpected pos" and holds the file while it lives.
    with open(path, "wb") as f:
        torch.save(obj, f)


def save_model(run_dir, agent, args):
    model = {"agent": agent.state_dict(), "args": asdict(args)}
    write_atomically(os.path.join(run_dir, "model.pt"), lambda tmp: torch_save(model, tmp), durable=True)


def versions():
    try:
        import mujoco
    except ImportError:
        mujoco = None
    return {"python": platform.python_version(), "torch": torch.__version__, "gymnasium": gym.__version__,
            "mujoco": mujoco and mujoco.__version__, "numpy": np.__version__, "tyro": tyro.__version__}


def one_decimal(x):
    return "n/a" if x is None else f"{x:.1f}"


EVAL_FIELDS = ("eval_return", "max_eval_return", "eval_step")


class RunRecord:
    """What a run leaves in its folder besides checkpoint.pt: TensorBoard events, summary.json (rewritten
    every iteration and at the end, whatever the end) and, on an explosion, postmortem.pt; and the counters
    and clocks they report (SPS times training alone, start-up left out: see train)."""

    def __init__(self, args, run_dir, run_name, total_timesteps, checkpoint):
        self.args, self.run_dir, self.run_name = args, run_dir, run_name
        self.summary_path = os.path.join(run_dir, "summary.json")
        if args.track:
            import wandb

            wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                       config=vars(args), name=run_name, monitor_gym=True, save_code=True)
        self.writer, self.events = None, f"the TensorBoard events in {run_dir}"
        self.resumed_at = checkpoint["global_step"] if checkpoint else None
        self.summary = {
            "algo": ALGO, "env_id": args.env_id, "seed": args.seed, "args": asdict(args), "status": "running",
            "global_step": 0, "total_timesteps": total_timesteps, "exploded": False, "explosion_step": None,
            "explosion_reason": None, "nonfinite_updates": 0, "episodes": 0, "final_return": None,
            "max_return": None, "max_log10_ratio": None, "wall_time_s": 0.0, "cpu_time_s": 0.0, "startup_s": 0.0,
            "startup_cpu_s": 0.0, "sps": 0.0, "versions": versions(),
        }
        if args.eval_every:
            self.summary.update(dict.fromkeys(EVAL_FIELDS))
        self.episode_returns, self.moving_returns = [], []  # moving: mean of the last 10 episodes
        self.nonfinite_updates, self.max_log10_ratio = 0, -math.inf
        self.start_time, self.start_cpu_time = time.time(), time.process_time()
        # wall and CPU seconds of training (start-up left out, see train) before this process, and when its began
        self.trained, self.training_since = (0.0, 0.0), None
        if checkpoint:
            self.episode_returns, self.moving_returns = list(checkpoint["episode_returns"]), list(checkpoint["moving_returns"])
            self.nonfinite_updates, self.max_log10_ratio = checkpoint["nonfinite_updates"], checkpoint["max_log10_ratio"]
            self.start_time -= checkpoint["wall_time_s"]
            self.start_cpu_time -= checkpoint["cpu_time_s"]
            # a checkpoint from before start-up was timed apart counts all its time as training
            self.trained = (checkpoint["wall_time_s"] - checkpoint.get("startup_s", 0.0),
                            checkpoint["cpu_time_s"] - checkpoint.get("startup_cpu_s", 0.0))
            self.summary.update(checkpoint["evaluation"])

    def start(self):
        """Open the TensorBoard events (a resumed run hides what the run it continues logged after its checkpoint)
        and write the first summary."""
        resumed = self.resumed_at is not None
        with writing(self.events):
            self.writer = SummaryWriter(self.run_dir, purge_step=self.resumed_at + 1 if resumed else None)
            if not resumed:
                table = "\n".join(f"|{key}|{value}|" for key, value in vars(self.args).items())
                self.writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}")
        self.write_summary("running", self.resumed_at or 0)

    def state(self):
        """The counters, for a checkpoint."""
        return {"nonfinite_updates": self.nonfinite_updates, "max_log10_ratio": self.max_log10_ratio,
                "episode_returns": list(self.episode_returns), "moving_returns": list(self.moving_returns),
                **self.clock(), "evaluation": {key: self.summary[key] for key in EVAL_FIELDS if key in self.summary}}

    def training_started(self):
        """Start-up is over: from here on the run trains, and SPS is timed."""
        self.training_since = time.time(), time.process_time()

    def clock(self):
        """The run's wall and CPU seconds so far, over all its processes, and of them start-up's."""
        now = time.time(), time.process_time()
        since = self.training_since or now
        wall, cpu = now[0] - self.start_time, now[1] - self.start_cpu_time
        return {"wall_time_s": wall, "cpu_time_s": cpu, "startup_s": wall - self.trained[0] - (now[0] - since[0]),
                "startup_cpu_s": cpu - self.trained[1] - (now[1] - since[1])}

    def recent_return(self):
        """The mean return of the last 10 episodes (None before the first)."""
        return float(np.mean(self.episode_returns[-10:])) if self.episode_returns else None

    def sps(self, global_step, clock=None):
        """Steps per second of training: start-up left out (see train)."""
        clock = clock or self.clock()
        return global_step / max(clock["wall_time_s"] - clock["startup_s"], 1e-9)

    def log(self, global_step, scalars):
        # TensorBoard's own thread writes them: a failed write surfaces at the next call, or at flush
        with writing(self.events):
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, global_step)

    def flush(self):
        """Every event logged so far into the file (not on disk: in the kernel, which a kill leaves alone)."""
        if self.writer is not None:
            with writing(self.events):
                self.writer.flush()

    def on_episode(self, global_step, episode_return, episode_length):
        self.episode_returns.append(episode_return)
        self.moving_returns.append(self.recent_return())
        self.log(global_step, {"charts/episodic_return": episode_return, "charts/episodic_length": episode_length})

    def log_iteration(self, global_step, nonfinite, learning_rate, telemetry):
        """Count the update's non-finite steps and log the iteration's scalars; returns them all."""
        self.nonfinite_updates += nonfinite
        if not math.isnan(telemetry["stability/max_log10_ratio"]):
            self.max_log10_ratio = max(self.max_log10_ratio, telemetry["stability/max_log10_ratio"])
        telemetry = {**telemetry, "stability/nonfinite_updates": self.nonfinite_updates,
                     "charts/learning_rate": learning_rate, "charts/SPS": int(self.sps(global_step))}
        self.log(global_step, telemetry)
        return telemetry

    def log_evaluation(self, eval_return, global_step):
        best = self.summary["max_eval_return"]
        self.summary.update(eval_return=eval_return, eval_step=global_step,
                            max_eval_return=eval_return if best is None else max(best, eval_return))
        self.log(global_step, {"eval/episodic_return": eval_return})
        print(f"evaluation at global_step={global_step}: return {eval_return:.1f} "
              f"(deterministic policy, mean of {self.args.eval_episodes} episodes)", flush=True)

    def write_summary(self, status, global_step, **fields):
        clock = self.clock()  # one reading, so that sps agrees with the clocks beside it
        self.summary.update(
            status=status, global_step=global_step, nonfinite_updates=self.nonfinite_updates,
            episodes=len(self.episode_returns), final_return=self.recent_return(),
            max_return=max(self.moving_returns) if self.moving_returns else None,
            max_log10_ratio=self.max_log10_ratio if math.isfinite(self.max_log10_ratio) else None,
            **clock, sps=self.sps(global_step, clock), **fields,
        )
        text = json.dumps(self.summary, indent=2)
        write_atomically(self.summary_path, lambda tmp: Path(tmp).write_text(text), durable=status != "running")

    def iteration_done(self, iteration, num_iterations, global_step, telemetry):
        print(f"iteration {iteration}/{num_iterations} global_step={global_step} "
              f"return(last 10)={one_decimal(self.recent_return())} "
              f"max_log10_ratio={telemetry['stability/max_log10_ratio']:.3g} SPS={telemetry['charts/SPS']}",
              flush=True)
        self.write_summary("running", global_step)

    def completed(self, global_step):
        self.flush()
        self.write_summary("completed", global_step)
        evaluation = f", evaluation return {one_decimal(self.summary['eval_return'])}" if self.args.eval_every else ""
        print(f"completed {global_step} steps in {self.run_dir}: final return "
              f"{one_decimal(self.summary['final_return'])} (mean of the last 10 episodes){evaluation}", flush=True)

    def exploded(self, explosion, telemetry, global_step, iteration, agent, optimizer):
        """postmortem.pt: the exploding minibatch, the networks and optimizer state before its step, and the
        args, to replay it offline (see replay)."""
        step = dict(zip(STEP_RECORD, explosion.step_record.cpu()))
        path = os.path.join(self.run_dir, "postmortem.pt")
        postmortem = {
            "reason": explosion.reason, "loss": step["loss"], "grad_norm": step["grad_norm"],
            "global_step": global_step, "iteration": iteration, "epoch": explosion.epoch,
            "minibatch": {key: value.detach().cpu() for key, value in explosion.minibatch.items()},
            "agent": {key: value.cpu() for key, value in agent.state_dict().items()},
            "optimizer": optimizer.state_dict(), "args": asdict(self.args), "obs_dim": agent.critic[0].in_features,
            "action_low": agent.action_low.cpu().numpy(), "action_high": agent.action_high.cpu().numpy(),
            "stats": {key: step[key] for key in SURROGATE_STATS}, "telemetry": telemetry,
        }
        write_atomically(path, lambda tmp: torch_save(postmortem, tmp), durable=True)
        print(explosion_message(explosion, telemetry, global_step, iteration, path), flush=True)
        self.flush()
        self.write_summary("exploded", global_step, exploded=True, explosion_step=global_step,
                           explosion_reason=explosion.reason)

    def interrupted(self, global_step, checkpoints):
        # a second signal must not cut the checkpoint short
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            checkpoints.write()
            self.write_summary("interrupted", global_step)
        except WriteFailed as e:
            return self.failed(e, global_step, checkpoints)
        saved = checkpoints.latest
        resume = (f"; the checkpoint holds global step {saved['global_step']} (the start of iteration "
                  f"{saved['iteration']}): continue with --resume {self.run_dir}") if saved else ""
        print(f"interrupted at global step {global_step}; summary in {self.summary_path}{resume}", file=sys.stderr)

    def failed(self, error, global_step, checkpoints):
        """Status error, and one line on stderr: what failed and what to do. A failed write (a full disk) says how
        to resume; any other error leaves its traceback in error.txt (called while `error` is handled)."""
        if isinstance(error, WriteFailed):
            message = f"{error}; {checkpoints.resume_hint(error)}"
        else:
            message = f"{error}{self.save_traceback(error)}"
        for _ in range(2):  # the second try comes after the first's temporary file is gone
            try:
                self.write_summary("error", global_step, error=f"{type(error).__name__}: {error}")
                break
            except WriteFailed as e:
                failure = e
        else:
            message += f" (and {failure})"
        print(f"error: {message}", file=sys.stderr)

    def save_traceback(self, error):
        """error.txt; what the one line says about it."""
        path, text = os.path.join(self.run_dir, "error.txt"), traceback.format_exc()
        try:
            write_atomically(path, lambda tmp: Path(tmp).write_text(text))
        except WriteFailed as e:
            return f" (no traceback saved: {e})"
        return "" if isinstance(error, EnvNonFinite) else f" (traceback in {path})"

    def close(self):
        if self.writer is not None:
            with contextlib.suppress(OSError):  # a failed write of the events, reported when it surfaced before
                self.writer.close()
        if self.args.track:
            import wandb

            wandb.finish()


def load_postmortem(path):
    """The agent, optimizer state, minibatch and args of an exploded step, as saved."""
    postmortem = torch.load(path, map_location="cpu", weights_only=False)
    args = Args(**postmortem["args"])
    agent = Agent(postmortem["obs_dim"], postmortem["action_low"], postmortem["action_high"], args)
    agent.load_state_dict(postmortem["agent"])
    return agent, postmortem, args


def replay(path, device="cpu"):
    """Recompute the exploded minibatch's loss from postmortem.pt on `device`: (loss, grad_norm, stats)."""
    agent, postmortem, args = load_postmortem(path)
    agent.to(device)
    minibatch = {key: value.to(device) for key, value in postmortem["minibatch"].items()}
    loss, _, _, _, stats = minibatch_loss(agent, minibatch, args, surrogate_function(args))
    loss.backward()
    grad_norm = nn.utils.get_total_norm([p.grad for p in agent.parameters() if p.grad is not None])
    return loss.detach(), grad_norm, stats


# checkpoint.pt is written at the first iteration boundary and then at most once a minute: a hard kill
# loses at most a minute of training, and a write (tens of ms for a [1024, 1024] Humanoid) that rarely
# is not measurable. SIGTERM and Ctrl-C write the latest boundary's state whenever they come.
CHECKPOINT_INTERVAL_S = 60


class Checkpoints:
    """checkpoint.pt: the state at the latest iteration boundary, taken at every boundary (a few ms), so that
    an interrupt mid-iteration saves the state at that iteration's start."""

    def __init__(self, run_dir, resumed, args, run, agent, optimizer, envs, device):
        self.path = os.path.join(run_dir, "checkpoint.pt")
        self.latest = resumed  # until the first boundary, the checkpoint the run resumes from
        self.args, self.run, self.agent, self.optimizer, self.envs, self.device = args, run, agent, optimizer, envs, device
        self.written_at = -math.inf
        self.saved_step = resumed["global_step"] if resumed else None  # that of checkpoint.pt on disk

    def boundary(self, iteration, global_step, next_obs):
        """Everything needed to go on from the start of `iteration` exactly as if never cut."""
        self.latest = {
            "algo": ALGO, "args": asdict(self.args), "run_name": self.run.run_name, "iteration": iteration,
            "global_step": global_step, **self.run.state(),
            "agent": copy.deepcopy(self.agent.state_dict()), "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "next_obs": next_obs.copy(), "envs": env_state(self.envs), "rng": rng_state(self.device),
        }
        if time.time() - self.written_at >= CHECKPOINT_INTERVAL_S:
            self.write()

    def write(self):
        if self.latest is not None:
            self.run.flush()  # the events the checkpoint counts as logged go first: a kill after it loses none
            write_atomically(self.path, lambda tmp: torch_save(self.latest, tmp), durable=True)
            self.written_at, self.saved_step = time.time(), self.latest["global_step"]

    def resume_hint(self, failure):
        """What to do after `failure`, a WriteFailed, with the checkpoint on disk."""
        if self.saved_step is None:
            return f"no checkpoint was saved: start the run again {failure.once_fixed()}"
        return f"--resume {self.run.run_dir} continues from global step {self.saved_step} {failure.once_fixed()}"

    def remove(self):
        if os.path.exists(self.path):
            os.remove(self.path)


def resolve_run(args):
    """(args, checkpoint, run folder, run name): with --resume, those of the run to continue; else a copy of
    args (the caller's are never changed), no checkpoint, and a new folder."""
    if not args.resume:
        env_name = args.env_id.replace("/", "-").replace(":", "-")
        run_name = args.run_name or f"{env_name}__{args.exp_name}__{args.seed}__{int(time.time())}"
        return dataclasses.replace(args), None, os.path.join(args.log_dir, run_name), run_name
    if args != Args(resume=args.resume):
        raise BadArgument("--resume takes no other flag: the run goes on with its own args")
    run_dir = args.resume
    try:
        with open(os.path.join(run_dir, "summary.json")) as f:
            status = json.load(f)["status"]
    except (OSError, ValueError, KeyError, TypeError):
        status = None
    if status in ("completed", "exploded"):
        raise BadArgument(f"the run in {run_dir} has {status}: there is nothing to resume")
    path = os.path.join(run_dir, "checkpoint.pt")
    if not os.path.isfile(path):
        raise BadArgument(f"no checkpoint to resume from: {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        algo, args = checkpoint["algo"], Args(**checkpoint["args"])
    except Exception as e:
        raise BadArgument(f"cannot read {path}: {first_line(e)}")
    if algo != ALGO:
        raise BadArgument(f"{path} is a {algo} run: resume it with {algo}_continuous.py")
    return args, checkpoint, run_dir, checkpoint["run_name"]


# a live run holds this in its folder (an exclusive flock, its PID inside); reproduce.py reads it
RUN_LOCK = "run.lock"


def hold_run_folder(run_dir):
    """Make run_dir and hold its run.lock until the returned file is closed: one writer per run folder. The kernel
    releases a flock when its holder dies, however it dies, so a free lock is taken over, whoever left it."""
    path = os.path.join(run_dir, RUN_LOCK)
    try:
        os.makedirs(run_dir, exist_ok=True)
        lock = open(path, "a+")
    except OSError as e:
        raise BadArgument(f"cannot create {path}: {e.strerror or e}")
    for _ in range(10):  # for half a second: `reproduce.py list` holds it shared for an instant, to read it
        if flocked(lock):
            break
        time.sleep(0.05)
    else:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        lock.close()
        raise BadArgument(f"{run_dir} is in use by a live run (pid {holder}): "
                          "one process at a time writes a run folder")
    lock.truncate(0)
    lock.write(str(os.getpid()))
    lock.flush()
    return lock


def flocked(file):
    """Whether this process now holds an exclusive flock on `file` (always, where there is no flock)."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def envs_and_run_folder(args, run_dir):
    """(envs, eval_env, the run folder's lock): the envs first, so that a bad --env-id leaves no folder behind."""
    envs = make_envs(args, run_dir)
    eval_env = make_eval_env(args, run_dir) if args.eval_every else None
    try:
        return envs, eval_env, hold_run_folder(run_dir)
    except BadArgument:
        close_all(envs, eval_env)
        raise


def close_all(*resources):
    for resource in resources:
        if resource is not None:
            resource.close()


# what gymnasium's wrappers and envs carry from step to step besides the simulator: TimeLimit's step
# count, RecordEpisodeStatistics' running episode, the normalisation statistics and the env's RNG
ENV_STATE_ATTRS = {"_elapsed_steps", "episode_returns", "episode_lengths", "obs_rms", "return_rms",
                   "discounted_reward", "_np_random"}


def env_layers(env):
    """The env and every env it wraps, outermost first."""
    layers = [env]
    while hasattr(layers[-1], "env"):
        layers.append(layers[-1].env)
    return layers


def obs_normaliser(env):
    return next(layer for layer in env_layers(env) if isinstance(layer, gym.wrappers.NormalizeObservation))


def simulator_state(env):
    """MuJoCo's whole MjData (mj_getState's integration state is not enough: Humanoid's reward reads the
    centre of mass that the last mj_step derived), else the env's attributes where they pickle (classic
    control, the test envs), else None."""
    if type(getattr(env, "data", None)).__name__ == "MjData":
        return "mujoco", pickle.dumps(env.data)
    try:
        return "attributes", pickle.dumps(vars(env))
    except Exception:
        return None


def env_state(envs):
    """Per sub-env: the ENV_STATE_ATTRS of every layer, and the simulator's state."""
    return [([{name: copy.deepcopy(value) for name, value in vars(layer).items() if name in ENV_STATE_ATTRS}
              for layer in env_layers(env)], simulator_state(env.unwrapped)) for env in envs.envs]


def restore_env_state(envs, states, next_obs):
    """Put reset envs back into a saved state and return the next observations. An env whose simulator
    could not be saved starts a new episode instead (with its running statistics and RNG restored)."""
    next_obs = next_obs.copy()
    for i, (env, (layers, simulator)) in enumerate(zip(envs.envs, states)):
        for layer, saved in zip(env_layers(env), layers):
            vars(layer).update(copy.deepcopy(saved))
        if simulator is None:
            next_obs[i] = env.reset()[0]
        elif simulator[0] == "mujoco":
            import mujoco

            mujoco.mj_copyData(env.unwrapped.data, env.unwrapped.model, pickle.loads(simulator[1]))
        else:
            vars(env.unwrapped).update(pickle.loads(simulator[1]))
    return next_obs


def rng_state(device):
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state, device):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_interrupts():
    """For the run's length SIGTERM interrupts it as Ctrl-C does; the handlers are put back after."""
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
    try:
        yield
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def quiet_event_thread():
    """TensorBoard writes the events from a thread of its own, which prints a traceback when a write fails. The
    failure surfaces again at the run's next log or flush, which ends the run in one line: the thread keeps quiet."""
    hook = threading.excepthook
    threading.excepthook = lambda failed: None if type(failed.thread).__name__ == "_AsyncWriterThread" else hook(failed)
    try:
        yield
    finally:
        threading.excepthook = hook


EXIT_CODES = {"completed": 0, "exploded": 3, "interrupted": 130, "error": 1}


def main():
    args = tyro.cli(Args)
    try:
        summary = train(args)
    except BadArgument as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(EXIT_CODES[summary["status"]])


if __name__ == "__main__":
    main()
