"""Tiny deterministic environments for the training-script tests.

`gym.make("tests.envs:Counter-v0")` imports this module, which registers them, so the scripts
can be pointed at them from the command line (run from the repository root)."""
import gymnasium as gym
import numpy as np


class CounterEnv(gym.Env):
    """Observation (t, episode): the step within the episode and the episode's index. Reward 1 per
    step. Odd episodes terminate at t == 2; the others run into the time limit (4 steps)."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def __init__(self):
        self.episode = -1

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.episode += 1
        self.t = 0
        return self._obs(), {}

    def step(self, action):
        self.t += 1
        terminated = self.episode % 2 == 1 and self.t == 2
        return self._obs(), 1.0, terminated, False, {}

    def _obs(self):
        return np.array([self.t, self.episode], dtype=np.float32)


class StaggeredCounterEnv(CounterEnv):
    """A Counter that never terminates and truncates its episodes itself after 2 + seed % 3 steps: in a
    vector env seeded with s, env i ends its episodes at its own steps, apart from env 0's."""

    def reset(self, *, seed=None, options=None):
        if seed is not None:
            self.limit = 2 + seed % 3
        return super().reset(seed=seed)

    def step(self, action):
        self.t += 1
        return self._obs(), 1.0, False, self.t == self.limit, {}


class LopsidedCounterEnv(CounterEnv):
    """A Counter with an asymmetric action box whose upper edge low + (high - low) / 2 * 2 overshoots
    in float32."""

    action_space = gym.spaces.Box(np.array([-0.4, -2.0], np.float32), np.array([0.7, 3.0], np.float32))


class NonFiniteEnv(CounterEnv):
    """A Counter whose observation turns NaN at its fifth step: a broken simulator."""

    def _obs(self):
        return np.array([np.nan if self.t == 5 else self.t, 0.0], dtype=np.float32)


class NonFiniteRewardEnv(CounterEnv):
    """A Counter whose reward is infinite at its third step."""

    def step(self, action):
        obs, _, terminated, truncated, info = super().step(action)
        return obs, np.inf if self.t == 3 else 1.0, terminated, truncated, info


class ActionRewardEnv(CounterEnv):
    """A Counter whose reward is the action taken: an episode's return is the sum of its actions."""

    def step(self, action):
        obs, _, terminated, truncated, info = super().step(action)
        return obs, float(action[0]), terminated, truncated, info


gym.register("Counter-v0", entry_point=CounterEnv, max_episode_steps=4)
gym.register("StaggeredCounter-v0", entry_point=StaggeredCounterEnv)
gym.register("LopsidedCounter-v0", entry_point=LopsidedCounterEnv, max_episode_steps=4)
gym.register("ActionReward-v0", entry_point=ActionRewardEnv, max_episode_steps=4)
gym.register("NonFinite-v0", entry_point=NonFiniteEnv, max_episode_steps=100)
gym.register("NonFiniteReward-v0", entry_point=NonFiniteRewardEnv, max_episode_steps=100)
