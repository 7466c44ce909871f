"""The fused op under CUDA graph capture (skipped without a GPU): forward+backward captured once in
torch.cuda.graph and replayed on new inputs, copied into the captured tensors, gives what eager calls
give on those inputs, bit for bit (loss, gradient, every stat). The op promises no host
synchronisation and a grid that depends on N alone, so a replay must be exactly an eager call."""
import pytest
import torch

import fused_loss as F

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
N = 100_003  # not a multiple of the kernel's vector width: its scalar tail runs too


def inputs(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    old = -1.0 - torch.rand(N, generator=g, dtype=dtype)
    new = old + torch.randn(N, generator=g, dtype=dtype)
    adv = torch.randn(N, generator=g, dtype=dtype)
    adv[::7] = 0.0
    return new.cuda(), old.cuda(), adv.cuda()


def forward_backward(leaf, old, adv, kind):
    leaf.grad = None
    loss, stats = F.surrogate(leaf, old, adv, 0.2, kind, backend="extension")
    loss.backward()
    return loss.detach(), leaf.grad, stats


def bits(t):
    """The tensor's bit pattern: -0.0 and 0.0 differ, NaN equals the same NaN."""
    return t.view({torch.float32: torch.int32, torch.float64: torch.int64}[t.dtype]) if t.is_floating_point() else t


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("kind", F.KINDS)
def test_cuda_graph_replay_of_the_fused_op_is_bit_identical_to_eager(kind, dtype):
    F.load_extension(required=True)
    new, old, adv = inputs(dtype, seed=0)
    leaf = new.clone().requires_grad_()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graph asks
        forward_backward(leaf, old, adv, kind)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = forward_backward(leaf, old, adv, kind)
    losses = []
    for seed in (1, 2):  # fresh inputs: the replay must compute them, not repeat what it captured
        new, new_old, new_adv = inputs(dtype, seed)
        with torch.no_grad():
            leaf.copy_(new)
            old.copy_(new_old)
            adv.copy_(new_adv)
        graph.replay()
        eager = forward_backward(new.clone().requires_grad_(), new_old, new_adv, kind)
        torch.cuda.synchronize()
        assert torch.equal(bits(captured[0]), bits(eager[0])), "loss"
        assert torch.equal(bits(captured[1]), bits(eager[1])), "gradient"
        for key in F.STATS:
            assert torch.equal(bits(captured[2][key]), bits(eager[2][key])), key
        losses.append(captured[0].item())
    assert losses[0] != losses[1]
