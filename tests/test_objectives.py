"""The surrogate objectives themselves: each training script's inline copy against
fused_loss.surrogate_reference, and the reference against the paper's equations 11 (PPO clip),
13 (VPG) and 15 (CPG) worked out branch by branch with Python floats.
"""
import math

import pytest
import torch

import fused_loss as F
from tests.helpers import DTYPES, EPSS, assert_matches, edge_case, load_script, loss_grad_stats

SCRIPT_KINDS = [("ppo_continuous.py", "ppo"), ("ppo_continuous.py", "is"), ("cpg_continuous.py", "cpg"),
                ("vpg_continuous.py", "vpg")]
# Log-ratios inside log(1 - eps) .. log(1 + eps) and outside it on either side, for every eps in EPSS,
# far enough from its ends that each element's branch, and so its derivative, is unambiguous.
INSIDE, OUTSIDE = [-0.06, 0.0, 0.04], [-2.5, -0.6, 0.5, 1.5]
ADVS = [1.7, -0.8, 0.0]
# exp(log-ratio) past the dtype's largest float, and below its smallest
OVERFLOW = {torch.float32: [89.5, 120.0, -120.0], torch.float64: [710.5, 800.0, -800.0]}


def grid(log_ratios, dtype):
    """Every log-ratio with every advantage, on old log-probs that differ from element to element."""
    lr = torch.tensor(log_ratios, dtype=torch.float64).repeat_interleave(len(ADVS))
    adv = torch.tensor(ADVS, dtype=torch.float64).repeat(len(log_ratios))
    old = -torch.linspace(0.5, 4.0, len(lr), dtype=torch.float64)
    return (old + lr).to(dtype), old.to(dtype), adv.to(dtype)


@pytest.fixture(scope="module")
def scripts():
    return {name: load_script(name) for name in {name for name, _ in SCRIPT_KINDS}}


@pytest.mark.parametrize("eps", EPSS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("script, kind", SCRIPT_KINDS, ids=[f"{s[:3]}-{k}" for s, k in SCRIPT_KINDS])
def test_script_surrogate_matches_the_reference(scripts, script, kind, dtype, eps):
    # batches apart: an overflow or a NaN input makes the loss NaN, which would hide a wrong term in the
    # rest of its sum; "bounds" has log-ratios on the clip bounds and the clip_frac thresholds to the ulp
    batches = [grid(INSIDE + OUTSIDE, dtype), grid(OVERFLOW[dtype], dtype), edge_case("bounds", dtype, eps),
               edge_case("nonfinite", dtype, eps)]
    stats = []
    for new, old, adv in batches:
        ref = loss_grad_stats(F.surrogate_reference, new, old, adv, kind, eps=eps)
        assert_matches(ref, loss_grad_stats(scripts[script].surrogate, new, old, adv, kind, eps=eps))
        stats.append(ref[2])
    assert stats[1]["n_overflow"].item() == 2 * len(ADVS)  # the overflow rows really overflow
    assert stats[3]["n_nonfinite"].item() > 0


def by_hand(new, old, adv, eps, kind):
    """Loss, d loss / d new_logp and stats of one batch, from the paper's formulas, in float64."""
    surr, grad, effective, log_ratios, kl, clipped = [], [], [], [], [], 0
    for x, o, a in zip(new, old, adv):
        lr = x - o
        r = math.exp(lr)  # d r / d x = r
        if kind == "ppo":  # eq. 11: min(r A, clip(r, 1 - eps, 1 + eps) A)
            if a >= 0 and r > 1 + eps:  # the gain is capped at (1 + eps) A: a constant
                s, ds, e = (1 + eps) * a, 0.0, math.log(1 + eps)
            elif a < 0 and r < 1 - eps:  # the loss is capped at (1 - eps) A
                s, ds, e = (1 - eps) * a, 0.0, math.log(1 - eps)
            else:  # r A is the smaller, also where r is outside the clip range against A's sign
                s, ds, e = r * a, r * a, lr
        elif kind == "cpg":  # eq. 15: the same with log r and log(1 -/+ eps)
            if a >= 0 and lr > math.log(1 + eps):
                s, ds, e = math.log(1 + eps) * a, 0.0, math.log(1 + eps)
            elif a < 0 and lr < math.log(1 - eps):
                s, ds, e = math.log(1 - eps) * a, 0.0, math.log(1 - eps)
            else:
                s, ds, e = lr * a, a, lr
        elif kind == "is":  # the plain importance-sampled objective, r A
            s, ds, e = r * a, r * a, lr
        else:  # eq. 13: log pi(a|s) A, with new_logp = log pi(a|s)
            s, ds, e = x * a, a, lr
        surr.append(s)
        grad.append(-ds / len(new))  # loss = -mean(surrogate)
        effective.append(e)
        log_ratios.append(lr)
        kl.append((r - 1) - lr)
        clipped += abs(r - 1) > eps
    n = len(new)
    stats = {"max_log_ratio": max(log_ratios), "min_log_ratio": min(log_ratios),
             "max_log_ratio_effective": max(effective), "clip_frac": clipped / n, "approx_kl": math.fsum(kl) / n}
    return -math.fsum(surr) / n, grad, stats


@pytest.mark.parametrize("eps", EPSS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("kind", F.KINDS)
def test_reference_matches_the_paper_by_hand(kind, dtype, eps):
    new, old, adv = grid(INSIDE + OUTSIDE, dtype)
    loss, grad, stats = loss_grad_stats(F.surrogate_reference, new, old, adv, kind, eps=eps)
    want_loss, want_grad, want_stats = by_hand(new.tolist(), old.tolist(), adv.tolist(), eps, kind)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
    assert loss.item() == pytest.approx(want_loss, abs=tol["atol"], rel=tol["rtol"])
    torch.testing.assert_close(grad, torch.tensor(want_grad, dtype=dtype), **tol)
    for name, want in want_stats.items():
        assert stats[name].item() == pytest.approx(want, abs=tol["atol"], rel=tol["rtol"]), name
    assert 0 < want_stats["clip_frac"] < 1  # both branches were taken


@pytest.mark.parametrize("script, kind", [("ppo_continuous.py", "ppo"), ("cpg_continuous.py", "cpg")])
def test_effective_log_ratio_element_by_element(scripts, script, kind):
    # one-element batches: over a batch the max hides a wrong branch taken for small log-ratios
    cases = [(0.5, 0.0, math.log(1.2)), (0.5, 0.5, math.log(1.2)), (0.5, -1.0, 0.5), (-0.5, -1.0, math.log(0.8)),
             (-0.5, 1.0, -0.5)]
    for log_ratio, adv, want in cases:
        for surrogate in (scripts[script].surrogate, F.surrogate_reference):
            new, zero, advantage = (torch.tensor([x], dtype=torch.float64) for x in (log_ratio, 0.0, adv))
            _, stats = surrogate(new, zero, advantage, 0.2, kind)
            assert stats["max_log_ratio_effective"].item() == pytest.approx(want), (log_ratio, adv)
