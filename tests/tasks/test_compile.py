"""``task.compile=true``: the equilibrium cell is compiled in place, outputs and gradients match
eager, and checkpoints keep their keys (they load with or without compilation)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from deq_lightning.deq import DEQ
from deq_lightning.models.contract import ModelOutput
from deq_lightning.tasks.base import compile_equilibrium_cells


class Cell(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)
        nn.init.orthogonal_(self.linear.weight, gain=0.5)  # a contraction: every solve converges

    def forward(self, z: Tensor, u: Tensor) -> Tensor:
        return torch.tanh(self.linear(z) + u)


class TinyDEQ(nn.Module):
    equilibrium_cell = "cell"

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.inject = nn.Linear(4, width)
        self.cell = Cell(width)
        self.head = nn.Linear(width, 3)
        opts = {"max_iter": 40, "tol": 1e-6, "compact": "on"}
        self.deq = DEQ(solver="anderson", solver_opts=opts, backward="implicit")

    def forward(self, x: Tensor) -> ModelOutput:
        u = self.inject(x)

        def f(z: Tensor, index: Tensor | None = None) -> Tensor:
            return self.cell(z, u if index is None else u[index])

        z, stats = self.deq(f, torch.zeros_like(u))
        return ModelOutput(self.head(z), stats)


@pytest.mark.slow
def test_compiled_cell_matches_eager_and_keeps_checkpoint_keys():
    torch.manual_seed(0)
    eager = TinyDEQ()
    compiled = copy.deepcopy(eager)
    (cell,) = compile_equilibrium_cells(compiled)
    assert cell is compiled.cell and cell._compiled_call_impl is not None
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    # Inputs of very different scale converge after different numbers of steps, so compaction
    # hands the compiled cell several batch sizes (dynamic shapes).
    x = torch.randn(6, 4) * torch.tensor([0.1, 0.1, 1, 1, 5, 5])[:, None]
    for model in (eager, compiled):
        model.deq.compute_jac_loss = True  # differentiates f's graph twice (create_graph)
        torch.manual_seed(1)  # the same random probe vectors for the Jacobian term
        out, stats = model(x)
        (out.square().sum() + stats.jac_loss.mean()).backward()
        model.deq.compute_jac_loss = False
    out_e, stats_e = eager(x)
    out_c, stats_c = compiled(x)
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-6)
    assert torch.equal(stats_c.nstep, stats_e.nstep)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    # A checkpoint of the compiled model loads into an eager one.
    fresh = TinyDEQ()
    fresh.load_state_dict(compiled.state_dict())
    torch.testing.assert_close(fresh(x)[0], out_e, rtol=1e-5, atol=1e-6)


def test_a_model_without_a_cell_is_compiled_whole():
    model = nn.Sequential(nn.Linear(2, 2))
    assert compile_equilibrium_cells(model) == [model] and model._compiled_call_impl is not None
