"""The model families opt in to batch compaction: their f keeps the ``index`` contract.

The contract (see ``deq_lightning.deq.solvers.takes_index``): ``f(z[idx], index=idx)`` equals
``f(z)[idx]``. It is checked on the flat f each family's DEQ actually solves (captured with
``capture_problems``), and end to end where the tiny models converge at different steps.
"""

from __future__ import annotations

import pytest
import torch

from deq_lightning.deq import capture_problems, deq_override
from tests.models.test_deq_flow import frames
from tests.models.test_deq_flow import tiny as flow_tiny
from tests.models.test_deq_transformer import tiny as lm_tiny
from tests.models.test_deq_transformer import tokens
from tests.models.test_mdeq import make_contractive
from tests.models.test_mdeq import tiny as mdeq_tiny


def mdeq():
    model = make_contractive(mdeq_tiny(2, post_gn_affine=True)).eval()
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    x[::2] *= 0.01  # every other image is nearly blank: an easy fixed point
    return model, (x,), model.backbone.layer


def lm():
    model = lm_tiny(dropout=0.0).double().eval()
    with torch.no_grad():  # a first segment fills the memory, so f closes over it too
        first, _ = model(tokens(4, 12, seed=2))
    return model, (tokens(4, 12), None, first.mems), model.layer


def flow():
    model = flow_tiny(deq={"solver": "anderson", "solver_opts": {"max_iter": 6}}).eval()
    return model, frames(4), model.update_block


def lm_first_segment():
    model, _, layer = lm()
    return model, (tokens(4, 12),), layer


FAMILIES = {"mdeq": mdeq, "deq_transformer": lm, "deq_flow": flow}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_f_keeps_the_index_contract(family):
    model, inputs, _ = FAMILIES[family]()
    with torch.no_grad(), capture_problems(model) as found:
        model(*inputs)
    (problem,) = found
    f, z = problem.f, problem.z_star
    assert f.takes_index, f"{family}'s f does not accept index: it would never be compacted"
    idx = torch.tensor([0, 2, 3])
    with torch.no_grad():
        full, part = f(z), f(z[idx], index=idx)
    tol = 1e-10 if z.dtype == torch.float64 else 1e-5
    torch.testing.assert_close(part, full[idx], rtol=tol, atol=tol)
    with torch.no_grad():  # rows chosen again (the flow model caches selected pyramids)
        again = f(z[idx[1:]], index=idx[1:])
    torch.testing.assert_close(again, full[idx[1:]], rtol=tol, atol=tol)


@pytest.mark.parametrize(
    "family, opts",
    [
        ("mdeq", {"max_iter": 60, "tol": 1e-6}),
        ("deq_transformer", {"max_iter": 60, "tol": 1e-2}),
    ],
)
def test_family_compacted_eval_equals_uncompacted(family, opts):
    build = lm_first_segment if family == "deq_transformer" else FAMILIES[family]
    model, inputs, layer = build()
    rows: list[int] = []

    def count(_module, args, _out):
        z = args[0]
        rows.append((z[0] if isinstance(z, (list, tuple)) else z).shape[0])

    layer.register_forward_hook(count)
    outs, seen, status = {}, {}, {}
    for mode in ("on", "off"):
        rows.clear()
        with torch.no_grad(), deq_override(model, eval_solver_opts={**opts, "compact": mode}):
            out, stats = model(*inputs)
        outs[mode], seen[mode], status[mode] = out, list(rows), stats.forward.status
        assert stats.forward.converged.any(), stats.forward.stop_reason
    assert torch.equal(status["on"], status["off"])
    batch = inputs[0].shape[0]
    assert min(seen["on"]) < batch and set(seen["off"]) == {batch}
    on, off = outs["on"], outs["off"]
    if family == "deq_transformer":
        on, off = on.log_probs, off.log_probs
    tol = 1e-10 if on.dtype == torch.float64 else 1e-5
    torch.testing.assert_close(on, off, rtol=tol, atol=tol)
