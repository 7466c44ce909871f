"""What several test modules share: running the training scripts and reading their outputs, and the fused
surrogate's inputs and comparisons."""
import contextlib
import importlib.util
import io
import json
import math
import os
import runpy
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import fused_loss as F

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["ppo_continuous.py", "cpg_continuous.py", "vpg_continuous.py"]
TINY = ["--policy-hidden", "8", "--value-hidden", "8"]
# the paper's central experiment (Appendix A.2): the mean shifted far outside Humanoid's action box
SHIFTED_HUMANOID = ["--env-id", "Humanoid-v4", "--mean-shift", "100", "--policy-hidden", "1024", "1024"]
# three envs that truncate their episodes after 2, 3 and 4 steps; two iterations of 32 steps each
STAGGERED = ["--env-id", "tests.envs:StaggeredCounter-v0", "--num-envs", 3, "--num-steps", 32, "--minibatch-size", 32,
             "--total-timesteps", 192, *TINY]

# --- the training scripts -------------------------------------------------------------------------------


def load_script(name, folder=ROOT):
    """A training script as a module (not __main__: it trains nothing)."""
    spec = importlib.util.spec_from_file_location(name[:-3], Path(folder) / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(script, *args, cwd=ROOT, timeout=300, script_dir=ROOT, warnings="ignore"):
    """Run a training script in a process of its own: its CompletedProcess. warnings: PYTHONWARNINGS."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": warnings}
    return subprocess.run([sys.executable, str(Path(script_dir) / script), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def cli_in_process(script, *args):
    """Run a script's command line in this process, for exits before training (no start-up cost): its exit
    code and stderr. The signal handlers are put back, should a missed check start the run."""
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    argv, stderr = sys.argv, io.StringIO()
    sys.argv = [script, *map(str, args)]
    try:
        with pytest.raises(SystemExit) as exit_info, contextlib.redirect_stderr(stderr):
            runpy.run_path(str(ROOT / script), run_name="__main__")
    finally:
        sys.argv = argv
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    return exit_info.value.code, stderr.getvalue()


def default_sigint():
    """In the child: Ctrl-C semantics even when the tests run in the background (SIGINT inherited ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def interrupt(script, *args, after, signum=signal.SIGTERM, script_dir=ROOT):
    """Run a script and send it `signum` once it has printed `iteration {after}/`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, str(Path(script_dir) / script), *map(str, args)], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    printed = []
    for line in process.stdout:
        printed.append(line)
        if line.startswith(f"iteration {after}/"):
            process.send_signal(signum)
            break
    stdout, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, "".join(printed) + stdout, stderr)


def summary_of(run_dir):
    return json.loads((Path(run_dir) / "summary.json").read_text())


def scalars_of(run_dir, steps=False):
    """Every scalar's values as TensorBoard shows them (purged events left out), with their steps if asked."""
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return {tag: [(e.step, e.value) if steps else e.value for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


def completed_run(script, *args, run_dir):
    """Train to the end and return the run's scalars, after checking they are all finite."""
    result = run_script(script, *args, "--log-dir", run_dir.parent, "--run-name", run_dir.name)
    assert result.returncode == 0, result.stderr
    assert summary_of(run_dir)["status"] == "completed"
    scalars = scalars_of(run_dir)
    assert not [tag for tag, values in scalars.items() if not np.isfinite(values).all()]
    return scalars


# --- the fused surrogate ----------------------------------------------------------------------------------

EPS = 0.2
EPSS = [0.1, EPS, 0.3]  # a kernel ignoring clip_coef passes every test that only uses the default
DTYPES = [torch.float32, torch.float64]
INF, NAN = math.inf, math.nan
# On CPU the extension calls the exp eager torch.exp uses (MKL VML on x86 builds), so every
# per-element result is bit-identical there; elsewhere ratios may differ in the last ulp.
EXACT_EXP_CPU = torch.backends.mkl.is_available()
EXACT = dict(rtol=0, atol=0)
EDGE_ADVS = [1.5, -0.7, 0.0, 1e-3, -3.0]


def loss_grad_stats(fn, new, old, adv, kind, view=None, upstream=1.0, eps=EPS):
    """A surrogate's loss, d loss / d new_logp (through autograd) and stats. `view` maps the leaves to the inputs."""
    leaf = new.detach().clone().requires_grad_()
    view = view or (lambda t: t)
    loss, stats = fn(view(leaf), view(old), view(adv), eps, kind)
    (loss * upstream).backward()
    return loss.detach(), leaf.grad, stats


def assert_matches(ref, got):
    (l0, g0, s0), (l1, g1, s1) = ref, got
    assert l1.shape == () and l1.dtype == l0.dtype and l1.device == l0.device
    torch.testing.assert_close(l1, l0, equal_nan=True)  # sums: same terms, other order
    exact_exp = EXACT if g0.device.type == "cpu" and EXACT_EXP_CPU else {}
    torch.testing.assert_close(g1, g0, equal_nan=True, **exact_exp)
    assert list(s1) == list(s0) == [*F.FLOAT_STATS, *F.INT_STATS]
    for k in F.FLOAT_STATS:
        assert s1[k].shape == () and s1[k].dtype == l0.dtype and not s1[k].requires_grad, k
        if k == "clip_frac":
            assert_within_one_ulp(s1[k], s0[k], k)
            continue
        tol = {} if k == "approx_kl" else EXACT  # maxima and minima are exact
        torch.testing.assert_close(s1[k], s0[k], equal_nan=True, **tol, msg=lambda m, k=k: f"{k}: {m}")
    for k in F.INT_STATS:
        assert s1[k].shape == () and s1[k].dtype == torch.int64, k
        assert s1[k].item() == s0[k].item(), (k, s1[k].item(), s0[k].item())


def assert_within_one_ulp(got, want, name):
    # count / N rounded once, against eager's float mean of a mask, which rounds differently on CUDA
    assert (around([want.item()], want.dtype, 1) == got).any(), f"{name}: {got.item()!r} vs {want.item()!r}"


def around(values, dtype, ulps):
    """Each value rounded to dtype and its `ulps` neighbours on either side."""
    out = []
    for v in values:
        x = torch.tensor(v, dtype=dtype)
        up = down = x
        out.append(x)
        for _ in range(ulps):
            up, down = torch.nextafter(up, torch.tensor(INF, dtype=dtype)), torch.nextafter(down, torch.tensor(-INF, dtype=dtype))
            out += [up, down]
    return torch.stack(out)


def edge_grid(log_ratios, dtype, advs=EDGE_ADVS, old=0.0):
    """Every log-ratio against every advantage; new_logp = old + lr exactly when old = 0."""
    lr = torch.as_tensor(log_ratios, dtype=dtype).repeat_interleave(len(advs))
    adv = torch.tensor(advs, dtype=dtype).repeat(len(lr) // len(advs))
    old_t = torch.full_like(lr, old)
    return old_t + lr, old_t, adv


def edge_case(case, dtype, eps):
    big = {torch.float32: [88.5, 88.75, 88.8, 100.0], torch.float64: [709.5, 709.8, 710.0, 1000.0]}[dtype]
    if case == "bounds":  # exactly at log(1 +- eps), log1p(+-eps) and 8 ulps either side: ppo ties and clamp ends
        lrs = around([math.log(1 + eps), math.log(1 - eps), math.log1p(eps), math.log1p(-eps)], dtype, 8)
        return edge_grid(torch.cat([lrs, torch.tensor([0.0, 1e-4, -1e-4, 3.0, -3.0, 20.0, -20.0], dtype=dtype)]), dtype)
    if case == "overflow":  # exp(log ratio) past the dtype's max, and just under it
        return edge_grid(big + [-b for b in big] + [0.1, 50.0], dtype, old=-2.5)
    if case == "nonfinite":  # +-inf and NaN in each input
        new, old, adv = edge_grid([INF, -INF, NAN, 0.05, 1.0], dtype)
        old[1::7], adv[2::11] = -INF, NAN
        adv[3::13] = INF
        return new, old, adv
    raise ValueError(case)


# --- equivalence with an earlier version -------------------------------------------------------------------


def scripts_at(commit, folder):
    """The three training scripts as they were at `commit`, written into `folder` under their own names (a
    script's default --exp-name is its file name). Skips the test where this checkout's history lacks it."""
    for script in SCRIPTS:
        shown = subprocess.run(["git", "show", f"{commit}:{script}"], cwd=ROOT, capture_output=True, text=True)
        if shown.returncode:
            pytest.skip(f"this checkout's git history lacks {commit}: {shown.stderr.strip()}")
        (Path(folder) / script).write_text(shown.stdout)
    return folder


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_equal_tensors(before, after):
    assert before.keys() == after.keys()
    for key in before:
        torch.testing.assert_close(torch.as_tensor(after[key]).double(), torch.as_tensor(before[key]).double(),
                                   rtol=0, atol=0, equal_nan=True, msg=key)
