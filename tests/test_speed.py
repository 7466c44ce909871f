"""What makes a --cuda step cheap (issue 19), tested on CPU where it can be and on CUDA where it must be: the step
record is one float32 tensor, built without composite isfinite calls, whose flag catches a non-finite loss or
gradient norm; the epoch guard restores every state tensor in place; the warm-up's stand-in minibatch is shaped as
a rollout's; SPS leaves start-up out, also over a resume. On CUDA (skipped without a GPU): the rollout's policy mean
waits for the device once per env step, and every CUDA graph is captured before training is timed."""
import copy
import math
import signal
import time
import warnings

import numpy as np
import pytest
import torch

import fused_loss as F
from tests.helpers import SCRIPTS, assert_equal_tensors, load_script, scalars_of

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=cuda)]
OBS_DIM, ACT_DIM = 5, 2


def tiny_agent(module, device, optimizer="adam"):
    """(args, agent, optimizer, state tensors) of a small policy, its optimizer primed as train() does."""
    args = module.Args(policy_hidden=(8,), value_hidden=(8,), optimizer=optimizer)
    agent = module.Agent(OBS_DIM, -np.ones(ACT_DIM), np.ones(ACT_DIM), args).to(device)
    params = list(agent.parameters())
    opt = module.make_optimizer(params, args)
    return args, agent, opt, module.prime_optimizer(opt, params)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("script", SCRIPTS)
def test_step_record_is_one_float32_tensor_flagging_a_nonfinite_loss_or_grad_norm(script, device, monkeypatch):
    module = load_script(script)
    args, agent, opt, _ = tiny_agent(module, device)
    mb = module.stand_in_minibatch(16, OBS_DIM, ACT_DIM, device)
    record = module.gradient_step(agent, opt, mb, args, module.surrogate)
    assert record.dtype == torch.float32 and record.shape == (len(module.STEP_RECORD),) and not record.requires_grad
    loss, pg_loss, v_loss, entropy, stats = module.minibatch_loss(agent, mb, args, module.surrogate)
    for name, value in {"loss": loss, "pg_loss": pg_loss, "v_loss": v_loss, "entropy": entropy, **stats}.items():
        torch.testing.assert_close(module.recorded(record, name), value.detach().float(), msg=name)
    assert module.recorded(record, "nonfinite").item() == 0

    minibatch_loss, clip_grad_norm = module.minibatch_loss, torch.nn.utils.clip_grad_norm_
    for bad in [math.inf, -math.inf, math.nan]:
        with monkeypatch.context() as patch:  # the loss alone non-finite: its gradients are 0, and so is their norm
            patch.setattr(module, "minibatch_loss", lambda *a, bad=bad: replaced_first(minibatch_loss(*a), bad))
            record = module.gradient_step(agent, opt, mb, args, module.surrogate)
        assert module.recorded(record, "grad_norm").item() == 0 and module.recorded(record, "nonfinite").item() == 1
        with monkeypatch.context() as patch:  # the gradient norm alone
            patch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, bad=bad: clip_grad_norm(*a) * 0 + bad)
            record = module.gradient_step(agent, opt, mb, args, module.surrogate)
        assert math.isfinite(module.recorded(record, "loss").item())
        assert module.recorded(record, "nonfinite").item() == 1


def replaced_first(values, bad):
    """minibatch_loss's values with the loss made `bad`, its gradient kept (times 0)."""
    loss, *rest = values
    return loss * 0 + bad, *rest


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_step_calls_no_isfinite_and_stacks_a_single_dtype(script):
    module = load_script(script)
    args, agent, opt, _ = tiny_agent(module, "cpu")
    mb = module.stand_in_minibatch(16, OBS_DIM, ACT_DIM, "cpu")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        module.gradient_step(agent, opt, mb, args, module.surrogate)
    events = profile.events()
    assert not [e for e in events if e.name == "aten::isfinite"]
    cats = [e for e in events if e.name == "aten::cat"]
    # a cat of mixed dtypes copies its inputs one by one
    assert cats and not [e for e in cats if any(child.name == "aten::copy_" for child in e.cpu_children)]


@pytest.mark.parametrize("script", SCRIPTS)
def test_nonfinite_and_overflow_counts_are_those_of_isfinite(script):
    module = load_script(script)
    inf, nan = math.inf, math.nan
    new = torch.tensor([0.0, inf, 0.0, 0.0, nan, 100.0, inf, 1.0, -inf, 0.5])
    old = torch.tensor([0.0, 0.0, -inf, 0.0, 0.0, 0.0, inf, 0.0, 0.0, 0.0])
    adv = torch.tensor([1.0, 1.0, 1.0, nan, 1.0, 1.0, 1.0, -inf, 1.0, 1.0])
    log_ratio = new - old
    # as counted before, with isfinite
    want_nonfinite = (~(new.isfinite() & old.isfinite() & adv.isfinite())).sum()
    want_overflow = (log_ratio.isfinite() & log_ratio.exp().isinf()).sum()
    assert (want_nonfinite.item(), want_overflow.item()) == (7, 1)
    for stats in (module.ratio_diagnostics(new, old, adv, 0.2, clipped_objective=True),
                  F.surrogate_reference(new, old, adv, 0.2, "ppo")[1]):
        assert stats["n_nonfinite"].dtype == stats["n_overflow"].dtype == torch.int64
        assert (stats["n_nonfinite"].item(), stats["n_overflow"].item()) == (7, 1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_rollback_restores_every_state_tensor_in_place(optimizer, device):
    module = load_script("ppo_continuous.py")
    args, agent, opt, state = tiny_agent(module, device, optimizer)
    mb = module.stand_in_minibatch(16, OBS_DIM, ACT_DIM, device)

    def steps(n):
        for _ in range(n):
            module.optimizer_step(opt, module.gradient_step(agent, opt, mb, args, module.surrogate))

    guard = module.EpochGuard(state, list(agent.parameters()), opt, None, enabled=True)
    steps(2)  # Adam's moments and step count off their start
    guard.snapshot()
    snapshot = copy.deepcopy((agent.state_dict(), opt.state_dict()["state"]))
    addresses = [t.data_ptr() for t in state]
    steps(3)
    assert not torch.equal(agent.state_dict()["actor_mean.0.weight"], snapshot[0]["actor_mean.0.weight"])
    guard.rollback()
    assert_equal_tensors(snapshot[0], agent.state_dict())
    assert snapshot[1].keys() == opt.state_dict()["state"].keys()
    for index, tensors in snapshot[1].items():
        assert_equal_tensors(tensors, opt.state_dict()["state"][index])
    assert [t.data_ptr() for t in state] == addresses  # CUDA graphs read and write them there


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_stand_in_minibatch_is_shaped_as_a_rollouts(script, tmp_path):
    module = load_script(script)
    args = module.Args(env_id="Hopper-v4", num_envs=2, num_steps=8, minibatch_size=4, policy_hidden=(8,),
                       value_hidden=(8,))
    envs = module.make_envs(args, str(tmp_path))
    obs_dim, act_dim = envs.single_observation_space.shape[0], envs.single_action_space.shape[0]
    agent = module.Agent(obs_dim, envs.single_action_space.low, envs.single_action_space.high, args)
    policy_mean = module.make_policy_mean(agent, args.num_envs, obs_dim, torch.device("cpu"), graphed=False)
    batch = module.collect_rollout(envs, agent, policy_mean, envs.reset(seed=1)[0], args, torch.device("cpu"), 0,
                                   lambda *episode: None)[0]
    envs.close()
    real = module.shuffled_minibatches(batch, 4)[0]
    stand_in = module.stand_in_minibatch(4, obs_dim, act_dim, torch.device("cpu"))
    assert list(stand_in) == list(real)
    for key, value in real.items():
        assert (stand_in[key].shape, stand_in[key].dtype, stand_in[key].stride()) == \
            (value.shape, value.dtype, value.stride()), key


def counter_args(module, run_dir, **args):
    return module.Args(env_id="tests.envs:Counter-v0", policy_hidden=(8,), value_hidden=(8,), num_steps=32,
                       minibatch_size=16, total_timesteps=64, log_dir=str(run_dir.parent), run_name=run_dir.name,
                       **args)


def test_sps_leaves_start_up_out_also_over_a_resume(tmp_path, monkeypatch, capsys):
    module = load_script("cpg_continuous.py")
    delay = 2.0  # far longer than this run's training
    warm_up, collect_rollout = module.warm_up, module.collect_rollout

    def slow_warm_up(*args):
        time.sleep(delay)
        warm_up(*args)

    def rollout_cut_short(*args):
        if args[6] == 32:  # the second rollout; train's handler makes SIGTERM a KeyboardInterrupt
            signal.raise_signal(signal.SIGTERM)
        return collect_rollout(*args)

    monkeypatch.setattr(module, "warm_up", slow_warm_up)
    monkeypatch.setattr(module, "collect_rollout", rollout_cut_short)
    cut = module.train(counter_args(module, tmp_path / "run"))
    assert cut["status"] == "interrupted" and cut["startup_s"] >= delay
    monkeypatch.setattr(module, "collect_rollout", collect_rollout)
    summary = module.train(module.Args(resume=str(tmp_path / "run")))
    assert summary["status"] == "completed" and summary["global_step"] == 64
    assert summary["startup_s"] >= 2 * delay  # both processes'
    training_s = summary["wall_time_s"] - summary["startup_s"]
    assert 0 < training_s < delay
    assert summary["sps"] == pytest.approx(64 / training_s, rel=1e-9)
    assert 0 < summary["startup_cpu_s"] < summary["cpu_time_s"]
    # logged at the last iteration's end, before the summary: less training time, so at least its SPS, where
    # a chart that counted the 2 * delay of start-up would show under 64 / (2 * delay) = 16
    charted = scalars_of(tmp_path / "run")["charts/SPS"][-1]
    assert charted >= int(summary["sps"])
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("iteration 2/2 ")]
    assert printed and printed[-1].endswith(f" SPS={int(charted)}")  # the log line reads the chart's number


@cuda
@pytest.mark.parametrize("graphed", [True, False], ids=["graphed", "eager"])
def test_cuda_policy_mean_waits_once_per_env_step(graphed):
    module = load_script("ppo_continuous.py")
    args, agent, _, _ = tiny_agent(module, "cuda")
    policy_mean = module.make_policy_mean(agent, 3, OBS_DIM, torch.device("cuda"), graphed)
    observations = [np.random.default_rng(seed).standard_normal((3, OBS_DIM), dtype=np.float32) for seed in range(5)]
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with torch.inference_mode(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            means = [policy_mean(obs) for obs in observations]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchronizing" in str(w.message)]
    assert len(syncs) == len(observations), [str(w.message) for w in caught]
    with torch.inference_mode():
        for obs, mean in zip(observations, means):  # each its own array, not the buffer the next step overwrote
            np.testing.assert_allclose(mean, agent.mean(torch.as_tensor(obs, device="cuda")).cpu().numpy(),
                                       rtol=1e-6, atol=1e-6)


@cuda
def test_cuda_graphs_are_all_captured_in_start_up(tmp_path, monkeypatch):
    module = load_script("ppo_continuous.py")
    events = []
    capture, training_started = module.capture, module.RunRecord.training_started
    monkeypatch.setattr(module, "capture", lambda *args: (events.append("capture"), capture(*args))[1])
    monkeypatch.setattr(module.RunRecord, "training_started",
                        lambda self: (events.append("training"), training_started(self))[1])
    summary = module.train(module.Args(env_id="Hopper-v4", cuda=True, policy_hidden=(64, 64), total_timesteps=2000,
                                       log_dir=str(tmp_path), run_name="run"))
    assert summary["status"] == "completed"
    # the policy mean's, and the gradient step's of minibatches of 64 and of the last one of 40
    assert events == ["capture"] * 3 + ["training"]
    assert 0 < summary["startup_s"] < summary["wall_time_s"]
