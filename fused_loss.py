"""Policy-gradient surrogate losses with overflow diagnostics, and an optional fused C++/CUDA op.

    loss, stats = surrogate(new_logp, old_logp, advantages, clip_coef, kind, backend="auto")
    loss, stats = surrogate_reference(new_logp, old_logp, advantages, clip_coef, kind)
    backend_info() -> str

kind: "ppo" (paper eq. 11), "cpg" (eq. 15, the clipped log-ratio objective), "is" (plain
importance ratio, Fig. 3c), "vpg" (eq. 13). The reference is the ground truth; the extension
(csrc/) computes loss, d loss / d new_logp and all stats in one pass and reproduces the
reference's autograd gradient element by element, including its inf/NaN behaviour.
"""
import contextlib
import hashlib
import math
import os
import sys
import types
import warnings
from pathlib import Path

import torch

KINDS = ("ppo", "cpg", "is", "vpg")
BACKENDS = ("auto", "extension", "reference")
FLOAT_STATS = ("max_log_ratio", "min_log_ratio", "max_log_ratio_effective", "clip_frac", "approx_kl")
INT_STATS = ("n_nonfinite", "n_overflow")
STATS = (*FLOAT_STATS, *INT_STATS)
_CSRC = Path(__file__).resolve().parent / "csrc"


def _check(new_logp, old_logp, advantages, clip_coef, kind):
    """The one input validation, shared by both backends so they raise identical errors."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
    if isinstance(clip_coef, bool) or not isinstance(clip_coef, (int, float)) or not 0 < clip_coef < 1:
        raise ValueError(f"clip_coef must be a float in (0, 1); got {clip_coef!r}")
    ts = {"new_logp": new_logp, "old_logp": old_logp, "advantages": advantages}
    for name, t in ts.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    shape, dtype, device = new_logp.shape, new_logp.dtype, new_logp.device
    what = None
    if len(shape) != 1 or old_logp.shape != shape or advantages.shape != shape:
        what = "1-D of equal length"
    elif shape[0] == 0:
        what = "non-empty (N >= 1)"
    elif dtype not in (torch.float32, torch.float64) or old_logp.dtype != dtype or advantages.dtype != dtype:
        what = "of one dtype, float32 or float64"
    elif old_logp.device != device or advantages.device != device:
        what = "on one device"
    if what:
        got = ", ".join(f"{k}={tuple(t.shape)} {t.dtype} {t.device}" for k, t in ts.items())
        raise ValueError(f"new_logp, old_logp, advantages must be {what}; got {got}")


def _reference(new_logp, old_logp, advantages, clip_coef, kind):
    # Training scripts carry an inline copy of this function: keep the two identical.
    old_logp, adv = old_logp.detach(), advantages.detach()
    log_ratio = new_logp - old_logp
    if kind == "ppo":
        ratio = torch.exp(log_ratio)
        surr = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - clip_coef, 1 + clip_coef) * adv)
    elif kind == "cpg":
        surr = torch.minimum(log_ratio * adv, torch.clamp(log_ratio, math.log(1 - clip_coef), math.log(1 + clip_coef)) * adv)
    elif kind == "is":
        surr = torch.exp(log_ratio) * adv
    else:  # vpg
        surr = new_logp * adv
    loss = -surr.mean()
    with torch.no_grad():
        lr = log_ratio.detach()
        ratio = torch.exp(lr)
        eff = lr  # log of the ratio as the clipped objective uses it
        if kind in ("ppo", "cpg"):
            eff = torch.where(adv >= 0, lr.clamp(max=math.log(1 + clip_coef)), lr.clamp(min=math.log(1 - clip_coef)))
        stats = {
            "max_log_ratio": lr.max(),
            "min_log_ratio": lr.min(),
            "max_log_ratio_effective": eff.max(),
            "clip_frac": ((lr > math.log1p(clip_coef)) | (lr < math.log1p(-clip_coef))).to(lr.dtype).mean(),
            "approx_kl": ((ratio - 1) - lr).mean(),
            # x * 0 is NaN exactly where x is inf or NaN (isfinite is four kernels each)
            "n_nonfinite": (new_logp.detach() * 0 + old_logp * 0 + adv * 0).isnan().sum(),
            "n_overflow": ((ratio == math.inf) & (lr != math.inf)).sum(),  # exp of a finite log-ratio overflowed
        }
    return loss, stats


def surrogate_reference(new_logp, old_logp, advantages, clip_coef, kind):
    """Plain PyTorch surrogate: (loss, stats). Gradient flows to new_logp only."""
    _check(new_logp, old_logp, advantages, clip_coef, kind)
    return _reference(new_logp, old_logp, advantages, clip_coef, kind)


def surrogate(new_logp, old_logp, advantages, clip_coef, kind, backend="auto"):
    """Same result as surrogate_reference, computed by the fused op when `backend` selects it."""
    _check(new_logp, old_logp, advantages, clip_coef, kind)
    if _use_extension(backend, new_logp.device):
        loss, _, fstats, istats = torch.ops.stable_pg.surrogate_fwd.default(
            new_logp, old_logp.detach(), advantages.detach(), float(clip_coef), KINDS.index(kind))
        return loss, dict(zip(STATS, (*fstats.unbind(), *istats.unbind())))
    return _reference(new_logp, old_logp, advantages, clip_coef, kind)


# ---------------------------------------------------------------------------------------------
# Extension: JIT build once per process, fake kernel registered here (autograd is in C++), backend choice.

def _new_state():
    # error: why the extension did not build; cuda_error: why it has no CUDA kernel though a GPU is there
    return types.SimpleNamespace(path=None, devices=(), error=None, cuda_error=None, warned=set())


_state = _new_state()


def _requested(backend):
    if backend == "auto":
        backend = os.environ.get("FUSED_LOSS_BACKEND", "auto").strip().lower() or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"FUSED_LOSS_BACKEND must be one of {', '.join(BACKENDS)}; got {backend!r}")
    elif backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    return backend


def _use_extension(backend, device):
    backend = _requested(backend)
    if backend == "reference":
        return False
    ok = load_extension()
    if ok and device.type in _state.devices:
        return True
    if not ok:
        why = f"extension build failed: {_state.error}"
    elif device.type == "cuda" and _state.cuda_error:
        why = f"its CUDA kernel did not build: {_state.cuda_error}"
    else:
        why = f"no {device.type} kernel was built"
    if backend == "extension":
        raise RuntimeError(f"fused_loss: backend='extension' is unavailable: {why}")
    if why not in _state.warned:  # one warning per reason, not per call
        _state.warned.add(why)
        warnings.warn(f"fused_loss: using the reference surrogate ({why})", RuntimeWarning, stacklevel=3)
    return False


def backend_info():
    """One line: which backend backend='auto' uses, and why."""
    backend = _requested("auto")
    if backend == "reference":
        return "reference (FUSED_LOSS_BACKEND=reference)"
    if load_extension():
        no_cuda = f"; no CUDA kernel: {_state.cuda_error}" if _state.cuda_error else ""
        return f"extension ({', '.join(_state.devices)}, built in {_state.path}{no_cuda})"
    if backend == "extension":
        return f"unavailable (FUSED_LOSS_BACKEND=extension, but the extension build failed: {_state.error})"
    return f"reference (extension build failed: {_state.error})"


def load_extension(required=False):
    """Build and load the op once per process; True when available. Never raises unless required."""
    if _state.path is None and _state.error is None:
        try:
            _state.path, _state.devices, _state.cuda_error = _build()
            _register()
        except Exception as e:  # no compiler, no ninja, compile error, ...
            _state.error = _describe(e)
    if required and _state.path is None:
        raise RuntimeError(f"fused_loss: extension build failed: {_state.error}")
    return _state.path is not None


def _describe(error):
    """One line for a build error: its first line and the first compiler line saying 'error'."""
    lines = str(error).strip().splitlines() or [""]
    first_error = next((l.strip() for l in lines[1:] if "error" in l.lower()), "")
    return f"{type(error).__name__}: {lines[0][:200]}" + (f" ... {first_error[:200]}" if first_error else "")


def _build():
    """(build dir, devices with a kernel, why there is no CUDA kernel though a GPU is visible)."""
    if torch.cuda.is_available():  # a CUDA build of torch with a visible GPU
        # pip's torch brings no nvcc: without the CUDA toolkit the CPU kernel still serves
        try:
            return _compile(cuda=True), ("cpu", "cuda"), None
        except Exception as e:
            cuda_error = _describe(e)
        return _compile(cuda=False), ("cpu",), cuda_error
    return _compile(cuda=False), ("cpu",), None


def _compile(cuda):
    from torch.utils import cpp_extension

    sources = [_CSRC / "surrogate.cpp"] + ([_CSRC / "surrogate_cuda.cu"] if cuda else [])
    omp = ["-fopenmp"] if torch.backends.openmp.is_available() else []  # at::parallel_for is inline OpenMP
    # Value-safe flags only: no fast-math and no FMA contraction, so every op rounds as eager
    # PyTorch's does; -fno-trapping-math only drops FP-exception semantics, letting selects vectorise.
    cflags = ["-O3", "-ffp-contract=off", "-fno-trapping-math", *omp]
    # Built where it runs, so it can target the ISA torch dispatches to here. The same
    # CPU_CAPABILITY also makes Vectorized<T>::exp (used when torch has no MKL) eager torch.exp's.
    cap = torch.backends.cpu.get_cpu_capability()
    isa = {"AVX2": ["-mavx2", "-mfma", "-mf16c"],
           "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"]}.get(cap, [])
    if isa:
        cflags += [*isa, f"-DCPU_CAPABILITY={cap}", f"-DCPU_CAPABILITY_{cap}"]
    cuda_cflags = ["-O3", "--fmad=false"]
    build_dir = _build_dir(sources, cflags, cuda_cflags)
    build_dir.mkdir(parents=True, exist_ok=True)
    with _build_lock(build_dir):
        if not (build_dir / f"{build_dir.name}.so").exists():
            print(f"fused_loss: building the fused op (once, about 30 s) in {build_dir}", file=sys.stderr, flush=True)
        cpp_extension.load(name=build_dir.name, sources=[str(s) for s in sources], extra_cflags=cflags,
                           extra_cuda_cflags=cuda_cflags, extra_ldflags=omp, build_directory=str(build_dir),
                           is_python_module=False, verbose=False)
    return build_dir


def _build_dir(sources, cflags, cuda_cflags):
    """A directory per source/flag/torch/Python-environment hash: edits never reuse stale objects, and
    builds for other torch versions or other environments (whose include paths build.ninja holds) do not
    rebuild each other's library."""
    h = hashlib.sha256(repr((torch.__version__, sys.prefix, sys.version, cflags, cuda_cflags)).encode())
    for f in [*sources, _CSRC / "surrogate.h"]:
        h.update(f.read_bytes())
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions")
    return Path(root) / f"stable_pg_{h.hexdigest()[:16]}"


@contextlib.contextmanager
def _build_lock(build_dir):
    # torch's cpp_extension guards a build with a 'lock' file that a killed build never removes;
    # every later load then waits on it forever. We take an flock first, which the kernel
    # releases when its holder dies: a 'lock' file found while holding it has no live owner.
    try:
        import fcntl
    except ImportError:  # not POSIX: keep torch's own locking
        yield
        return
    with open(build_dir / "build.flock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            warnings.warn(f"fused_loss: waiting for another process building the extension in {build_dir}")
            fcntl.flock(f, fcntl.LOCK_EX)
        stale = build_dir / "lock"
        if stale.exists():
            warnings.warn(f"fused_loss: removing stale build lock {stale} left by an interrupted build")
            stale.unlink(missing_ok=True)
        yield


def _fake(new_logp, old_logp, adv, clip_coef, kind):
    return (new_logp.new_empty(()), new_logp.new_empty(new_logp.shape), new_logp.new_empty(len(FLOAT_STATS)),
            new_logp.new_empty(len(INT_STATS), dtype=torch.int64))


def _register():
    if not getattr(torch.ops.stable_pg.surrogate_fwd, "_fused_loss_registered", False):
        torch.library.register_fake("stable_pg::surrogate_fwd")(_fake)
        torch.ops.stable_pg.surrogate_fwd._fused_loss_registered = True
