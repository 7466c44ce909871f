"""fused_loss: the extension against surrogate_reference (loss, autograd gradient, every stat),
edge cases (clip bounds to the ulp, exp overflow, inf/NaN), determinism, validation, opcheck,
torch.compile, the auto fallback and the stale build lock.

CI runs this with FUSED_LOSS_BACKEND=extension, so a broken build fails instead of skipping.
"""
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import fused_loss as F
from tests.helpers import DTYPES, EDGE_ADVS, EPS, EPSS, NAN, ROOT, assert_matches, edge_case, loss_grad_stats

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


@pytest.fixture(scope="session")
def ext():
    """Builds the extension once per session."""
    if not F.load_extension():
        if os.environ.get("FUSED_LOSS_BACKEND") == "extension":
            pytest.fail(f"extension build failed: {F._state.error}")
        pytest.skip(f"extension unavailable: {F._state.error}")
    return F


def ext_surrogate(*args):
    return F.surrogate(*args, backend="extension")


def python(code, **env):
    """`python -c code` in a fresh process at the repository root, with `env` added to ours."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **env}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def random_inputs(n, dtype, device="cpu", seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    old = -1.0 - torch.rand(n, generator=g, dtype=dtype)
    new = old + scale * torch.randn(n, generator=g, dtype=dtype)
    adv = torch.randn(n, generator=g, dtype=dtype)
    adv[::5] = 0.0
    return new.to(device), old.to(device), adv.to(device)


# --- equivalence --------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("n", [1, 7, 4096])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("kind", F.KINDS)
def test_matches_reference(ext, kind, dtype, n, strided, device):
    new, old, adv = random_inputs(2 * n if strided else n, dtype, device, seed=n)
    view = (lambda t: t[::2]) if strided else None
    assert_matches(loss_grad_stats(F.surrogate_reference, new, old, adv, kind, view), loss_grad_stats(ext_surrogate, new, old, adv, kind, view))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("eps", EPSS)
@pytest.mark.parametrize("case", ["bounds", "overflow", "nonfinite"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("kind", F.KINDS)
def test_edge_cases_match_reference(ext, kind, dtype, case, eps, device):
    new, old, adv = (t.to(device) for t in edge_case(case, dtype, eps))
    ref = loss_grad_stats(F.surrogate_reference, new, old, adv, kind, eps=eps)
    assert_matches(ref, loss_grad_stats(ext_surrogate, new, old, adv, kind, eps=eps))
    if case == "overflow":  # the cases really do overflow, and only the ones they should
        assert ref[2]["n_overflow"].item() == 3 * len(EDGE_ADVS)
        assert math.isinf(ref[2]["approx_kl"].item())
    if case == "nonfinite":
        assert ref[2]["n_nonfinite"].item() > 0 and not torch.isfinite(ref[1]).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("kind", F.KINDS)
def test_large_n_matches_reference_and_is_deterministic(ext, kind, dtype, device):
    new, old, adv = random_inputs(3_000_017, dtype, device, seed=1, scale=1.0)
    got = loss_grad_stats(ext_surrogate, new, old, adv, kind)
    assert_matches(loss_grad_stats(F.surrogate_reference, new, old, adv, kind), got)
    again = loss_grad_stats(ext_surrogate, new, old, adv, kind)
    assert torch.equal(got[0], again[0]) and torch.equal(got[1], again[1])
    assert all(torch.equal(got[2][k], again[2][k]) for k in got[2])


def test_bit_identical_across_thread_counts(ext):
    new, old, adv = random_inputs(200_003, torch.float32, scale=2.0)
    threads = torch.get_num_threads()
    try:
        outs = []
        for t in (1, max(2, threads)):
            torch.set_num_threads(t)
            outs.append(torch.ops.stable_pg.surrogate_fwd(new, old, adv, EPS, 0))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*outs))


@pytest.mark.parametrize("kind", F.KINDS)
def test_upstream_gradient_and_constant_inputs(ext, kind):
    new, old, adv = random_inputs(100, torch.float64, seed=3)
    grads = []
    for fn in (F.surrogate_reference, ext_surrogate):
        x, o, a = (t.clone().requires_grad_() for t in (new, old, adv))
        (-2.5 * fn(x, o, a, EPS, kind)[0]).backward()
        assert o.grad is None and a.grad is None  # old_logp and advantages are constants
        grads.append(x.grad)
    torch.testing.assert_close(grads[1], grads[0])


@pytest.mark.parametrize("kind", F.KINDS)
def test_gradcheck_away_from_kinks(ext, kind):
    g = torch.Generator().manual_seed(4)
    lr = torch.empty(24, dtype=torch.float64)
    lr[:12] = 0.1 * torch.rand(12, generator=g, dtype=torch.float64) - 0.05  # inside the clip range
    lr[12:] = torch.tensor([0.5, -0.5, 1.0, -1.0, 2.0, -2.0] * 2, dtype=torch.float64)  # outside it
    old = torch.randn(24, generator=g, dtype=torch.float64)
    adv = torch.randn(24, generator=g, dtype=torch.float64)
    x = (old + lr).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: ext_surrogate(t, old, adv, EPS, kind)[0], (x,))


# --- validation -----------------------------------------------------------------------------------

_t = torch.zeros(4)
BAD = {
    "2-D": (torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(2, 2), EPS, "ppo"),
    "0-D": (torch.tensor(0.0), torch.tensor(0.0), torch.tensor(0.0), EPS, "ppo"),
    "length mismatch": (_t, torch.zeros(3), _t, EPS, "ppo"),
    "empty": (torch.zeros(0), torch.zeros(0), torch.zeros(0), EPS, "cpg"),
    "int dtype": (torch.zeros(4, dtype=torch.int64),) * 3 + (EPS, "ppo"),
    "bool dtype": (torch.zeros(4, dtype=torch.bool),) * 3 + (EPS, "ppo"),
    "float16": (torch.zeros(4, dtype=torch.float16),) * 3 + (EPS, "ppo"),
    "dtype mismatch": (_t, _t.double(), _t, EPS, "ppo"),
    "device mismatch": (_t, torch.zeros(4, device="meta"), _t, EPS, "ppo"),
    "not a tensor": ([0.0] * 4, _t, _t, EPS, "ppo"),
    "bad kind": (_t, _t, _t, EPS, "trpo"),
    "clip 0": (_t, _t, _t, 0.0, "ppo"),
    "clip 1": (_t, _t, _t, 1.0, "ppo"),
    "clip nan": (_t, _t, _t, NAN, "ppo"),
    "clip bool": (_t, _t, _t, True, "ppo"),
    "clip str": (_t, _t, _t, "0.2", "ppo"),
}


MESSAGES = {
    "bad kind": "kind must be one of ppo, cpg, is, vpg; got 'trpo'",
    "clip 0": "clip_coef must be a float in (0, 1); got 0.0",
    "not a tensor": "new_logp must be a torch.Tensor; got list",
    "length mismatch": "new_logp, old_logp, advantages must be 1-D of equal length; got new_logp=(4,) torch.float32 "
                       "cpu, old_logp=(3,) torch.float32 cpu, advantages=(4,) torch.float32 cpu",
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_same_error_from_both_backends(ext, case):
    args = BAD[case]
    with pytest.raises(ValueError) as ref:
        F.surrogate_reference(*args)
    with pytest.raises(ValueError) as got:
        F.surrogate(*args, backend="extension")
    assert str(got.value) == str(ref.value) and "\n" not in str(ref.value)
    if case in MESSAGES:  # both backends share one check: what it says is tested here
        assert str(ref.value) == MESSAGES[case]


def test_backend_names(monkeypatch):
    with pytest.raises(ValueError, match="^backend must be one of auto, extension, reference; got 'cuda'$"):
        F.surrogate(_t, _t, _t, EPS, "ppo", backend="cuda")
    monkeypatch.setenv("FUSED_LOSS_BACKEND", "fast")
    with pytest.raises(ValueError, match="^FUSED_LOSS_BACKEND must be one of auto, extension, reference; got 'fast'$"):
        F.surrogate(_t, _t, _t, EPS, "ppo")
    monkeypatch.setenv("FUSED_LOSS_BACKEND", " Reference ")
    assert F._requested("auto") == "reference"
    monkeypatch.setenv("FUSED_LOSS_BACKEND", "")  # set but empty, as `FUSED_LOSS_BACKEND= cmd` leaves it
    assert F._requested("auto") == "auto"


# --- torch.library / torch.compile ----------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", F.KINDS)
def test_opcheck(ext, kind, device):
    dtype = DTYPES[F.KINDS.index(kind) % 2]
    new, old, adv = random_inputs(34, dtype, device, seed=5)
    if kind in ("is", "vpg"):  # also a strided input
        new, old, adv = new[::2], old[::2], adv[::2]
    torch.library.opcheck(torch.ops.stable_pg.surrogate_fwd, (new.requires_grad_(), old, adv, EPS, F.KINDS.index(kind)))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(ext, device):
    def f(new, old, adv):
        loss, stats = F.surrogate(new, old, adv, EPS, "ppo", backend="extension")
        return loss, stats

    compiled = torch.compile(f, fullgraph=True)
    new, old, adv = random_inputs(1000, torch.float32, device, seed=6, scale=1.0)
    l0, g0, s0 = loss_grad_stats(lambda *a: f(*a[:3]), new, old, adv, "ppo")
    l1, g1, s1 = loss_grad_stats(lambda *a: compiled(*a[:3]), new, old, adv, "ppo")
    assert torch.equal(l0, l1) and torch.equal(g0, g1) and all(torch.equal(s0[k], s1[k]) for k in s0)


# --- backend selection ----------------------------------------------------------------------------


def test_backend_choice_and_info(ext, monkeypatch):
    new, old, adv = random_inputs(64, torch.float32)
    x = new.requires_grad_()
    monkeypatch.delenv("FUSED_LOSS_BACKEND", raising=False)
    assert F.backend_info().startswith("extension (cpu")
    assert F.surrogate(x, old, adv, EPS, "ppo")[0].grad_fn.name() != "NegBackward0"  # the op, not eager
    assert F.surrogate(x, old, adv, EPS, "ppo", backend="reference")[0].grad_fn.name() == "NegBackward0"
    monkeypatch.setenv("FUSED_LOSS_BACKEND", "reference")
    assert F.surrogate(x, old, adv, EPS, "ppo")[0].grad_fn.name() == "NegBackward0"
    assert F.backend_info() == "reference (FUSED_LOSS_BACKEND=reference)"


@pytest.fixture
def built_state(monkeypatch):
    """A built extension's state, set by hand: load_extension then builds nothing, and any device
    list or CUDA failure can be posed in this process."""
    state = F._new_state()
    state.path, state.devices = "/ext", ("cpu",)
    monkeypatch.setattr(F, "_state", state)
    monkeypatch.delenv("FUSED_LOSS_BACKEND", raising=False)
    return state


def test_backend_info_names_the_devices_and_why_cuda_is_missing(built_state):
    built_state.devices = ("cpu", "cuda")
    assert F.backend_info() == "extension (cpu, cuda, built in /ext)"
    built_state.devices, built_state.cuda_error = ("cpu",), "OSError: no nvcc"
    assert F.backend_info() == "extension (cpu, built in /ext; no CUDA kernel: OSError: no nvcc)"


def test_a_device_without_a_kernel_gets_the_reference_and_the_reason(built_state):
    assert F._use_extension("auto", torch.device("cpu"))
    with pytest.warns(RuntimeWarning, match=r"using the reference surrogate \(no meta kernel was built\)"):
        assert not F._use_extension("auto", torch.device("meta"))
    with pytest.raises(RuntimeError, match="unavailable: no cuda kernel was built$"):
        F._use_extension("extension", torch.device("cuda"))
    built_state.cuda_error = "OSError: no nvcc"
    with pytest.raises(RuntimeError, match="unavailable: its CUDA kernel did not build: OSError: no nvcc$"):
        F._use_extension("extension", torch.device("cuda"))
    with pytest.raises(RuntimeError, match="unavailable: no meta kernel was built$"):
        F._use_extension("extension", torch.device("meta"))


def test_build_error_is_one_line_with_the_compiler_error():
    build = RuntimeError("Error building extension 'stable_pg'\nsurrogate.cpp:9: error: 'x' was not declared\n"
                         "ninja: build stopped: subcommand failed.")
    assert F._describe(build) == "RuntimeError: Error building extension 'stable_pg' ... surrogate.cpp:9: error: 'x' was not declared"
    assert F._describe(OSError("")) == "OSError: "
    assert F._describe(ValueError(f"{'a' * 300}\n  ERROR {'b' * 300}")) == f"ValueError: {'a' * 200} ... ERROR {'b' * 194}"


def test_fallback_warning_points_at_the_caller_of_surrogate(built_state):
    meta = torch.zeros(4, device="meta")
    with pytest.warns(RuntimeWarning, match="no meta kernel was built") as caught:
        assert F.surrogate(meta, meta, meta, EPS, "ppo")[0].device.type == "meta"
    assert caught[0].filename == __file__


def test_auto_falls_back_with_one_warning_when_build_fails(monkeypatch):
    def no_compiler():
        raise RuntimeError("Error checking compiler version for c++\nmore detail")

    monkeypatch.setattr(F, "_build", no_compiler)
    monkeypatch.setattr(F, "_state", F._new_state())
    monkeypatch.delenv("FUSED_LOSS_BACKEND", raising=False)
    new, old, adv = random_inputs(50, torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = [F.surrogate(new, old, adv, EPS, kind) for kind in F.KINDS for _ in range(2)]
    msgs = [str(w.message) for w in caught if str(w.message).startswith("fused_loss")]
    assert len(msgs) == 1 and "Error checking compiler version" in msgs[0], msgs
    for (loss, stats), kind in zip(results[::2], F.KINDS):
        ref_loss, ref_stats = F.surrogate_reference(new, old, adv, EPS, kind)
        assert torch.equal(loss, ref_loss) and all(torch.equal(stats[k], ref_stats[k]) for k in stats)
    assert F.backend_info() == "reference (extension build failed: RuntimeError: Error checking compiler version for c++)"
    with pytest.raises(RuntimeError, match="backend='extension' is unavailable.*compiler"):
        F.surrogate(new, old, adv, EPS, "ppo", backend="extension")
    monkeypatch.setenv("FUSED_LOSS_BACKEND", "extension")
    assert F.backend_info() == ("unavailable (FUSED_LOSS_BACKEND=extension, but the extension build failed: "
                                "RuntimeError: Error checking compiler version for c++)")
    with pytest.raises(RuntimeError, match="unavailable"):
        F.surrogate(new, old, adv, EPS, "ppo")
    with pytest.raises(RuntimeError, match="extension build failed: RuntimeError: Error checking compiler"):
        F.load_extension(required=True)  # also after the failure was cached


def gpu_without_cuda_toolkit():
    """The checks of the test below, run in a fresh process: they patch this module for good."""
    # pip's CUDA torch brings no nvcc: the CUDA compile fails, the CPU kernel must still serve
    compile_cpu = F._compile

    def no_nvcc(cuda):
        if cuda:
            raise OSError("CUDA_HOME environment variable is not set.\nmore detail")
        return compile_cpu(cuda)

    torch.cuda.is_available = lambda: True
    F._compile = no_nvcc
    assert F.load_extension(required=True) and F._state.devices == ("cpu",)
    assert F.backend_info().endswith("; no CUDA kernel: OSError: CUDA_HOME environment variable is not set.)")
    new, old, adv = random_inputs(50, torch.float64)
    assert F.surrogate(new.requires_grad_(), old, adv, EPS, "ppo")[0].grad_fn.name() != "NegBackward0"
    with pytest.warns(RuntimeWarning, match="its CUDA kernel did not build: OSError: CUDA_HOME"):
        assert not F._use_extension("auto", torch.device("cuda"))
    with pytest.raises(RuntimeError, match="unavailable: its CUDA kernel did not build"):
        F._use_extension("extension", torch.device("cuda"))


def test_gpu_without_cuda_toolkit_keeps_the_cpu_kernel(ext):
    # On a GPU box this process has loaded the CUDA build; loading the CPU-only one beside it, which
    # defines the same op, can abort the process, and with it the whole test session.
    proc = python("from tests.test_fused_loss import gpu_without_cuda_toolkit; gpu_without_cuda_toolkit()",
                  FUSED_LOSS_BACKEND="auto")
    assert proc.returncode == 0, proc.stderr


def test_each_python_environment_builds_in_a_folder_of_its_own(ext, monkeypatch):
    # build.ninja holds the environment's include paths: two venvs sharing a folder rebuild each other's op
    assert Path(F._state.path).parent == ROOT / "build" / "torch_extensions"  # the tests' own (conftest.py)
    sources, flags = [ROOT / "csrc" / "surrogate.cpp"], ["-O3"]
    here = F._build_dir(sources, flags, [])
    assert F._build_dir(sources, flags, []) == here
    monkeypatch.setattr(sys, "prefix", "/elsewhere/venv")
    assert F._build_dir(sources, flags, []).parent == here.parent and F._build_dir(sources, flags, []) != here


def test_a_build_says_so_in_one_line_and_a_built_op_says_nothing(tmp_path, monkeypatch, capsys):
    from torch.utils import cpp_extension

    def load(name, build_directory, **options):
        (Path(build_directory) / f"{name}.so").write_text("")

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(cpp_extension, "load", load)
    build_dir = F._compile(cuda=False)
    assert build_dir.parent == tmp_path
    assert capsys.readouterr().err == f"fused_loss: building the fused op (once, about 30 s) in {build_dir}\n"
    assert F._compile(cuda=False) == build_dir and capsys.readouterr().err == ""


def test_stale_build_lock_is_removed(ext):
    # A build killed mid-way leaves torch's 'lock' file behind; a fresh process must not wait on it.
    lock = Path(F._state.path) / "lock"
    lock.write_text("")
    proc = python("import fused_loss as F; F.load_extension(required=True); print(F.backend_info())")
    assert proc.returncode == 0, proc.stderr
    assert "removing stale build lock" in proc.stderr and proc.stdout.startswith("extension (")
    assert not lock.exists()


def test_double_backward_is_refused(ext):
    new, old, adv = random_inputs(10, torch.float64)
    x = new.requires_grad_()
    loss, _ = ext_surrogate(x, old, adv, EPS, "ppo")
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, x, create_graph=True)
