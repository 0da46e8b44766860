"""DEQ-TrellisNet language model (Bai et al., NeurIPS 2019; thesis ch. 3) and its layered twin.

A TrellisNet (Bai, Kolter & Koltun, ICLR 2019) is a temporal convolutional network whose layers
all share one weight matrix and all receive the input again. Applied "infinitely often", its
hidden sequence is the fixed point ``z* = f(z*, x)`` of that one layer, found by the solver in
``self.deq`` and differentiated through it. f is a causal convolution (kernel k = 2) over the
hidden units with an LSTM-style gated activation; the state is a pair (hidden h, cell c):

    a_t   = W * [h_{t-k+1} .. h_t] + u_t              the weight-shared causal conv (4 H outputs)
    u_t   = W_x * [x_{t-k+1} .. x_t]                  injection: a causal conv over the embeddings
    i, o, g, f = sigmoid, sigmoid, tanh, sigmoid of the four quarters of a_t
    c'_t  = f * c_{t-1} + i * g                       the previous position's cell
    h'_t  = o * tanh(c'_t)                            f(h, c) = (h', c')

The hidden units are H = nhid + nout wide; the last ``nout`` of h are the model's output
(``get_output`` of deq@pytorch-1.5:DEQModel/models/trellisnets/deq_trellisnet.py). Weight norm
(conv and injection) is computed once per model call and the hidden dropout mask (locked over
time) is drawn once: every solver step, the backward and every level of the twin see one f.

**History.** Positions before the segment enter f through the causal padding: the last k-1
hidden columns, the last cell column and the last k-1 embeddings (for the injection conv) of the
previous segment, detached (the reference's ``get_history``; it pads the embeddings with zeros,
we carry them so that segments equal one joint solve, which is tested). A new stream starts from
zeros, which is the reference's zero padding.

**The layered twin** (``depth = L > 0``): the same layer applied L times from zero state, weight
tied, with the input injected at every level: a TrellisNet of L levels exactly as the TrellisNet
paper defines it, each level padded with its own history (so ``History`` holds one column set per
level). It is the thesis's 60-layer (PTB) / 70-layer (WT103) TrellisNet of the memory table, one
override away (``model.depth=60``), trained by plain backprop (no DEQ module, stats ``None``).

Shapes: B batch, L segment length, E embedding size (= ``d_embed``), H = nhid + nout hidden
units, k kernel size, V vocabulary, D levels of history (1 for the DEQ). Inside the layer
sequences are channels first, ``(B, C, L)`` (what Conv1d takes); tokens and outputs are batch
first, ``(B, L, ...)``, as in :mod:`deq_transformer`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deq_lightning.deq import DEQ, DEQStats, VariationalDropout, apply_weight_norm, forward_scope
from deq_lightning.models.contract import ModelOutput
from deq_lightning.models.lm_layers import (
    AdaptiveEmbedding,
    AdaptiveLogSoftmax,
    LMOutput,
    check_tokens,
    check_vocab,
)

# SplitCrossEntropyLoss cutoffs of the WikiText-103 DEQ-TrellisNet
# (deq@pytorch-1.5:DEQModel/train_trellisnet.py, cutoffs = [2800, 20000, 76000]).
WT103_TRELLIS_CUTOFFS = (2800, 20000, 76000)


class History(NamedTuple):
    """What a segment leaves for the next one, detached, per level (D = 1 for the DEQ):
    ``h`` (B, D, H, k-1) the last k-1 hidden columns, ``c`` (B, D, H, 1) the last cell column,
    ``x`` (B, E, k-1) the last k-1 input embeddings (after input dropout)."""

    h: Tensor
    c: Tensor
    x: Tensor


def keep_last(old: Tensor, new: Tensor, n: int) -> Tensor:
    """The last ``n`` columns of ``[old, new]`` along the time axis (last dim), detached."""
    both = torch.cat([old, new.detach()], dim=-1)
    return both[..., both.shape[-1] - n :]


class TrellisNetLayer(nn.Module):
    """f: ((h, c) each (B, H, L), injection (B, 4H, L), history h (B, H, k-1), c (B, H, 1))
    -> (h', c'). One weight-shared causal conv with the LSTM-style gated activation."""

    def __init__(self, hidden: int, kernel_size: int, dropouth: float, init_std: float) -> None:
        super().__init__()
        self.hidden, self.kernel_size = hidden, kernel_size
        self.conv = nn.Conv1d(hidden, 4 * hidden, kernel_size)  # no padding: history pads it
        # WeightShareConv1d.init_weights: weight and bias ~ N(0, 0.01)
        nn.init.normal_(self.conv.weight, std=init_std)
        nn.init.normal_(self.conv.bias, std=init_std)
        # VariationalHidDropout: one mask per (sample, unit), locked over time.
        self.drop = VariationalDropout(dropouth, shared_dims=(2,))

    def forward(
        self, z: tuple[Tensor, Tensor], u: Tensor, hist_h: Tensor, hist_c: Tensor
    ) -> tuple[Tensor, Tensor]:
        h, c = z
        pre = self.conv(self.drop(torch.cat([hist_h, h], dim=2))) + u
        i, o, g, f = pre.chunk(4, dim=1)  # the reference's order: it, ot, gt, ft
        c_prev = torch.cat([hist_c, c[:, :, :-1]], dim=2)
        c_new = torch.sigmoid(f) * c_prev + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c_new), c_new


class MixtureOfSoftmaxes(nn.Module):
    """Mixture of softmaxes (Yang et al. 2018), as the reference's ``MixSoftmax``:
    ``p(w | h) = sum_k pi_k(h) softmax(E tanh(W_k h) + b)_w`` with the (tied) word embeddings E.
    ``dropoutl`` is a locked-over-time dropout on the latent before the tanh."""

    def __init__(
        self, n_experts: int, d_in: int, weights: AdaptiveEmbedding, dropoutl: float
    ) -> None:
        super().__init__()
        if len(weights.tables) != 1:
            raise ValueError(
                "a mixture of softmaxes needs a plain softmax; set model.adaptive=false or "
                "model.n_experts=0"
            )
        self.n_experts, self.weights = n_experts, weights
        d_embed = weights.tables[0].embedding_dim
        self.prior = nn.Linear(d_in, n_experts, bias=False)
        self.latent = nn.Linear(d_in, n_experts * d_embed)
        self.bias = nn.Parameter(torch.zeros(weights.tables[0].num_embeddings))
        self.drop = VariationalDropout(dropoutl, shared_dims=(1,))
        for lin in (self.prior, self.latent):  # MixSoftmax.init_weights: U(-0.1, 0.1)
            nn.init.uniform_(lin.weight, -0.1, 0.1)

    def log_prob(self, h: Tensor) -> Tensor:
        """(B, L, d_in) -> (B, L, V) log-probabilities."""
        B, L, _ = h.shape
        prior = self.prior(h).log_softmax(dim=-1)  # (B, L, K)
        latent = torch.tanh(self.drop(self.latent(h))).view(B, L, self.n_experts, -1)
        logits = F.linear(latent, self.weights.tables[0].weight, self.bias)  # (B, L, K, V)
        return (prior[..., None] + logits.log_softmax(dim=-1)).logsumexp(dim=2)


class DEQTrellisNetLM(nn.Module):
    """Word-level language model whose hidden sequence is the equilibrium of one TrellisNet layer
    (``depth=0``), or its layered twin (``depth=L``: the layer applied L times, weight-tied).

    ``forward(tokens (B, L), targets (B, L) | None, mems: History | None) ->
    ModelOutput(LMOutput, DEQStats | None)``, the interface of
    :class:`~deq_lightning.models.deq_transformer.DEQTransformerLM`, so the LM task,
    ``generate.py``, ``eval.py`` and the HyperAnderson trainer use it unchanged. Pass the
    returned ``mems`` to the next segment; ``None`` starts new streams.

    ``adaptive`` selects the split softmax over ``cutoffs`` (the WT103 script's
    SplitCrossEntropyLoss: clusters of one width, tied to the embedding); ``n_experts > 0`` a
    mixture of softmaxes. ``tie_weights`` shares the embedding with the output layer, which then
    needs ``nout == d_embed`` (unless a mixture of softmaxes maps nout to d_embed).
    """

    # The weight-tied module f applies (task.compile=true compiles it; see tasks/base.py).
    equilibrium_cell = "layer"

    def __init__(
        self,
        vocab_size: int,
        d_embed: int = 500,  # run_wt103_deq_trellisnet.sh --d_embed 500
        nhid: int = 1500,  # --nhid 1500
        nout: int = 500,  # --nout 500
        kernel_size: int = 2,  # train_trellisnet.py --ksize 2
        depth: int = 0,
        dropout: float = 0.1,  # --dropout 0.1 (output)
        dropouti: float = 0.1,  # --dropouti 0.1 (input)
        dropouth: float = 0.1,  # --dropouth 0.1 (hidden, inside f)
        dropoutl: float = 0.0,  # mixture-of-softmaxes latent
        emb_dropout: float = 0.0,  # train_trellisnet.py --emb_dropout 0.0 (whole words)
        n_experts: int = 0,  # train_trellisnet.py --n_experts 0 (no mixture of softmaxes)
        adaptive: bool = False,
        cutoffs: list[int] = WT103_TRELLIS_CUTOFFS,
        tie_weights: bool = True,
        weight_norm: bool = True,  # --wnorm (default on)
        init_std: float = 0.01,  # WeightShareConv1d.init_weights
        emb_init: float = 0.1,  # DEQTrellisNetLM.init_weights: U(-0.1, 0.1)
        deq: dict | None = None,
    ) -> None:
        super().__init__()
        cutoffs = list(cutoffs) if adaptive else []
        check_config(vocab_size, d_embed, nhid, nout, kernel_size, depth, cutoffs)
        if tie_weights and not n_experts and nout != d_embed:
            raise ValueError(
                f"tied weights need model.nout == model.d_embed (got {nout} and {d_embed}); "
                "set them equal, set model.tie_weights=false or use model.n_experts > 0"
            )
        self.vocab_size, self.d_embed, self.nout = vocab_size, d_embed, nout
        self.hidden = nhid + nout
        self.kernel_size, self.depth = kernel_size, depth
        self.emb_dropout = emb_dropout

        def table(dim: int) -> AdaptiveEmbedding:
            emb = AdaptiveEmbedding(vocab_size, dim, dim, cutoffs, 1, init_std=1.0)
            emb.scale = 1.0  # TrellisNet does not scale its embeddings (Transformer-XL does)
            for p in emb.parameters():
                nn.init.uniform_(p, -emb_init, emb_init)
            return emb

        self.embedding = table(d_embed)
        out_weights = self.embedding if tie_weights else table(d_embed if n_experts else nout)
        self.softmax = (
            MixtureOfSoftmaxes(n_experts, nout, out_weights, dropoutl)
            if n_experts
            else AdaptiveLogSoftmax(out_weights)
        )
        self.inject = nn.Conv1d(d_embed, 4 * self.hidden, kernel_size)
        self.layer = TrellisNetLayer(self.hidden, kernel_size, dropouth, init_std)
        if weight_norm:  # the reference normalises the injection and the temporal conv
            apply_weight_norm(self.inject)
            apply_weight_norm(self.layer)
        self.input_drop = VariationalDropout(dropouti, shared_dims=(2,))
        self.output_drop = VariationalDropout(dropout, shared_dims=(1,))
        self.deq = None if depth else DEQ(**(deq or {}))

    @property
    def levels(self) -> int:
        """Columns sets of history per stream: one per level of the twin, one for the DEQ."""
        return self.depth or 1

    def init_memory(self, batch: int, device: torch.device | None = None) -> History:
        """Zero history (the causal zero padding) for ``batch`` new streams."""
        dtype = self.inject.bias.dtype
        k, D, H = self.kernel_size, self.levels, self.hidden
        return History(
            torch.zeros(batch, D, H, k - 1, device=device, dtype=dtype),
            torch.zeros(batch, D, H, 1, device=device, dtype=dtype),
            torch.zeros(batch, self.d_embed, k - 1, device=device, dtype=dtype),
        )

    def forward(
        self, tokens: Tensor, targets: Tensor | None = None, mems: History | None = None
    ) -> ModelOutput:
        self._check_inputs(tokens, targets, mems)
        B = tokens.shape[0]
        hist = self.init_memory(B, tokens.device) if mems is None else History(*mems)
        # One scope for the whole call: weight norm and every dropout mask once, shared by the
        # solver's steps, the backward and all levels of the twin.
        with forward_scope():
            x = self.input_drop(self._embed(tokens).transpose(1, 2))  # (B, E, L)
            x_all = torch.cat([hist.x, x], dim=2)
            u = self.inject(x_all)  # (B, 4H, L): causal, the history supplies the padding
            if self.depth:
                (h, c), stats, hs, cs = self._unroll_levels(u, hist)
            else:
                (h, c), stats = self._solve(u, hist)
                hs, cs = [h], [c]
            k = self.kernel_size
            new = History(
                torch.stack([keep_last(hist.h[:, i], z, k - 1) for i, z in enumerate(hs)], dim=1),
                torch.stack([keep_last(hist.c[:, i], z, 1) for i, z in enumerate(cs)], dim=1),
                keep_last(hist.x, x, k - 1),
            )
            out = h[:, self.hidden - self.nout :].transpose(1, 2)  # (B, L, nout)
            return ModelOutput(self._read_out(out, targets, new), stats)

    def _solve(self, u: Tensor, hist: History) -> tuple[tuple[Tensor, Tensor], DEQStats]:
        hist_h, hist_c = hist.h[:, 0], hist.c[:, 0]

        def f(z: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
            return self.layer(z, u, hist_h, hist_c)

        B, _, L = u.shape
        z0 = (u.new_zeros(B, self.hidden, L), u.new_zeros(B, self.hidden, L))
        (h, c), stats = self.deq(f, z0)
        return (h, c), stats

    def _unroll_levels(
        self, u: Tensor, hist: History
    ) -> tuple[tuple[Tensor, Tensor], None, list[Tensor], list[Tensor]]:
        """The twin: ``depth`` levels from zero state; level i is padded with its own history
        and leaves the history of its input."""
        B, _, L = u.shape
        z = (u.new_zeros(B, self.hidden, L), u.new_zeros(B, self.hidden, L))
        hs, cs = [], []
        for i in range(self.depth):
            hs.append(z[0])
            cs.append(z[1])
            z = self.layer(z, u, hist.h[:, i], hist.c[:, i])
        return z, None, hs, cs

    def _embed(self, tokens: Tensor) -> Tensor:
        emb = self.embedding(tokens)
        if self.training and self.emb_dropout > 0:
            # Embedding dropout (Gal & Ghahramani; AWD-LSTM's embedded_dropout): whole words are
            # dropped for the whole batch.
            keep = 1.0 - self.emb_dropout
            mask = torch.empty(self.vocab_size, device=emb.device, dtype=emb.dtype)
            emb = emb * mask.bernoulli_(keep).div_(keep)[tokens][..., None]
        return emb

    def _read_out(self, z: Tensor, targets: Tensor | None, mems: History) -> LMOutput:
        h = self.output_drop(z)
        if isinstance(self.softmax, MixtureOfSoftmaxes):
            log_probs = self.softmax.log_prob(h)
            if targets is None:
                return LMOutput(None, log_probs, z, mems)
            return LMOutput(-log_probs.gather(-1, targets[..., None]).squeeze(-1), None, z, mems)
        return LMOutput(*self.softmax(h, targets), z, mems)

    def _check_inputs(self, tokens: Tensor, targets: Tensor | None, mems: History | None) -> None:
        check_tokens(tokens, targets, self.vocab_size)
        if mems is not None:
            want = self.init_memory(tokens.shape[0])
            got = [tuple(t.shape) for t in mems] if len(mems) == 3 else [len(mems)]
            if got != [tuple(t.shape) for t in want]:
                raise ValueError(
                    f"mems must be History(h {tuple(want.h.shape)}, c {tuple(want.c.shape)}, "
                    f"x {tuple(want.x.shape)}) for B={tokens.shape[0]} streams and "
                    f"{self.levels} level(s), got {got}; pass the mems returned for the "
                    "previous segment of the same batch (and model), or None to start"
                )


def check_config(
    vocab_size: int,
    d_embed: int,
    nhid: int,
    nout: int,
    kernel_size: int,
    depth: int,
    cutoffs: list[int],
) -> None:
    check_vocab(vocab_size, cutoffs)
    for name, value in (("d_embed", d_embed), ("nout", nout), ("kernel_size", kernel_size)):
        if value < 1:
            raise ValueError(f"model.{name} must be >= 1, got {value}")
    if nhid < 0:
        raise ValueError(f"model.nhid must be >= 0, got {nhid}")
    if depth < 0:
        raise ValueError(f"model.depth must be 0 (DEQ) or a number of levels, got {depth}")
