"""Training memory: the autograd graph of a DEQ step must not grow with the solver's iterations."""

import torch
from torch import nn

from deq_lightning.deq import DEQ


def saved_bytes(fn) -> int:
    """Bytes of all tensors autograd saves for backward while ``fn`` runs (the training graph)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def conv_step(deq):
    conv = nn.Conv2d(8, 8, 3, padding=1)
    norm = nn.GroupNorm(2, 8)
    x = torch.randn(2, 8, 12, 12)
    f = lambda z: norm(torch.tanh(0.2 * conv(z)) + x)  # noqa: E731

    def step():
        z, _ = deq(f, torch.zeros_like(x))
        z.sum().backward()

    return step


def test_implicit_graph_is_constant_in_forward_iterations():
    sizes = {
        n: saved_bytes(conv_step(DEQ(solver_opts={"max_iter": n, "tol": 1e-30}))) for n in (10, 60)
    }
    assert sizes[60] == sizes[10] > 0
    unrolled = saved_bytes(conv_step(DEQ(backward="unrolled", backward_opts={"steps": 40})))
    assert sizes[60] < 0.05 * unrolled


def test_unrolled_graph_grows_linearly():
    small = saved_bytes(conv_step(DEQ(backward="unrolled", backward_opts={"steps": 10})))
    large = saved_bytes(conv_step(DEQ(backward="unrolled", backward_opts={"steps": 20})))
    assert 1.9 < large / small < 2.1
