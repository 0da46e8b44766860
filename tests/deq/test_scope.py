import pickle

import torch
from torch import nn

from deq_lightning.deq import DEQ, VariationalDropout, apply_weight_norm, has_weight_norm


class Cell(nn.Module):
    """A conv cell with weight norm and channel dropout that records what each step saw."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.conv = apply_weight_norm(nn.Conv2d(3, 3, 3, padding=1))
        self.drop = VariationalDropout(p, shared_dims=(2, 3))
        self.seen_weights: list[torch.Tensor] = []
        self.seen_masks: list[torch.Tensor] = []

    def forward(self, z, x):
        out = self.drop(torch.tanh(0.3 * self.conv(z)))
        self.seen_weights.append(self.conv.weight)
        # The mask is recoverable where the pre-dropout value is non-zero.
        self.seen_masks.append((out != 0).float())
        return out + x


def test_weight_norm_replaces_parameter():
    conv = apply_weight_norm(nn.Conv2d(3, 4, 3))
    names = {n for n, _ in conv.named_parameters()}
    assert names == {"weight_g", "weight_v", "bias"}
    assert has_weight_norm(conv)
    w = conv.weight
    torch.testing.assert_close(w.flatten(1).norm(dim=1), conv.weight_g.flatten())
    pickle.loads(pickle.dumps(conv))  # ddp_spawn pickles the model


def test_weight_and_mask_constant_within_a_forward_fresh_across():
    cell = Cell()
    x = torch.randn(2, 3, 6, 6)
    deq = DEQ(solver_opts={"max_iter": 6, "tol": 1e-12})
    deq(lambda z: cell(z, x), torch.zeros_like(x))
    n_first = len(cell.seen_weights)
    assert n_first >= 6
    first_w = cell.seen_weights[:n_first]
    assert all(w is first_w[0] for w in first_w)  # computed once, shared by every step
    masks = torch.stack(cell.seen_masks[:n_first])
    assert (masks == masks[0]).all()
    assert 0 < masks[0].mean() < 1
    deq(lambda z: cell(z, x), torch.zeros_like(x))
    assert cell.seen_weights[n_first] is not first_w[0]
    assert not torch.equal(cell.seen_masks[n_first], masks[0])  # a fresh mask next forward


def test_weight_norm_gradients_reach_g_and_v_through_implicit_backward():
    cell = Cell(p=0.0)
    x = torch.randn(2, 3, 6, 6)
    z, stats = DEQ()(lambda z: cell(z, x), torch.zeros_like(x))
    z.sum().backward()
    assert stats.backward is not None
    assert cell.conv.weight_g.grad.abs().sum() > 0 and cell.conv.weight_v.grad.abs().sum() > 0


def test_outside_a_deq_weight_is_recomputed_each_call():
    cell = Cell(p=0.0)
    x = torch.randn(1, 3, 4, 4)
    cell(x, x)
    cell(x, x)
    assert cell.seen_weights[0] is not cell.seen_weights[1]


def test_dropout_mask_on_input_device_and_off_in_eval():
    drop = VariationalDropout(0.3, shared_dims=(2,))
    x = torch.ones(4, 5, 7)
    y = drop(x)
    assert y.device == x.device
    assert ((y == 0) | torch.isclose(y, torch.tensor(1 / 0.7))).all()
    assert (y == y[:, :, :1]).all()  # locked along dim 2
    drop.eval()
    assert torch.equal(drop(x), x)
