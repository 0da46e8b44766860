"""DEQ-Transformer language model (Bai et al., NeurIPS 2019; thesis ch. 3), top to bottom.

Instead of stacking N Transformer layers, one layer f is applied "infinitely often": the hidden
sequence of a segment is the fixed point ``z* = f(z*, x)``, found by the solver in ``self.deq``
and differentiated through that same DEQ (implicitly by default). f is one Transformer-XL layer:

    cat   = [memory z ; z]                           (B, K, d)   K = M + L
    q,k,v = W_qkv cat + u  (u = injection of x)      the input enters through the QKV projection
    a     = RelativeAttention(q, k, v)               Transformer-XL relative positions, causal
    z'    = LN(z + W_o a)                            post-LN (default) or pre-LN
    f(z)  = LN(z' + FFN(z'))

The memory is the previous segment's equilibrium (and its injection), detached: the next segment
attends to it without re-solving it. Because f is causal, solving two segments one after the other
with memory gives the same fixed point as solving them together (tested). The memory is returned,
never kept on the module, so the caller decides when a stream starts and ends.

Shapes: B batch, L segment length, M memory length, K = M + L keys, d = d_model, H heads of
size D = d_head, V vocabulary. Sequences are batch first: ``(B, L, ...)``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deq_lightning.deq import DEQ, VariationalDropout, apply_weight_norm
from deq_lightning.models.contract import ModelOutput
from deq_lightning.models.lm_layers import (
    AdaptiveEmbedding,
    AdaptiveLogSoftmax,
    LMOutput,
    check_tokens,
    check_vocab,
)

# Adaptive softmax of WikiText-103 (Transformer-XL, kept by the DEQ-Transformer:
# deq:DEQ-Sequence/wt103_deq_transformer.sh, --adaptive --div_val 4, cutoffs 20000,40000,200000).
WT103_CUTOFFS = (20000, 40000, 200000)


class Memory(NamedTuple):
    """What a segment leaves for the next one: its equilibrium ``z`` (B, M, d) and its injection
    ``u`` (B, M, 3*H*D), both detached. The keys/values of memory positions are rebuilt from them
    exactly as they were inside the previous solve."""

    z: Tensor
    u: Tensor


class AttentionContext(NamedTuple):
    """What a layer's attention reads besides z, fixed during a solve: the memory's keys/values
    ``mem_kv`` (B, M, 2*H*D), the position keys ``pos_keys`` (H, K, D) and the causal ``mask``
    (L, K)."""

    mem_kv: Tensor
    pos_keys: Tensor
    mask: Tensor


def layer_norm(x: Tensor) -> Tensor:
    # Parameter-free, as in the reference layer (deq:DEQ-Sequence/models/deq_transformer.py):
    # with weight norm on every linear map the scale lives in the weight-norm gains.
    return F.layer_norm(x, x.shape[-1:])


def sinusoid_positions(n: int, dim: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(n, dim) sinusoidal embeddings of the distances n-1, ..., 1, 0 (Transformer-XL's order)."""
    distance = torch.arange(n - 1, -1, -1.0, device=device)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, dim, 2, device=device) / dim)
    angles = distance[:, None] * inv_freq[None]
    return torch.cat([angles.sin(), angles.cos()], dim=-1).to(dtype)


def rel_shift(x: Tensor) -> Tensor:
    """Re-index relative-position scores from "column c = distance K-1-c" to "column j = key j".

    Query i sits at position M+i and needs distance M+i-j for key j, i.e. input column
    j + L-1-i: row i moves left by L-1-i. Padding one zero column and reading the buffer as
    (K+1, L) moves every row at once (Transformer-XL's trick); the entries it garbles are those of
    keys after the query, which the causal mask removes.
    """
    *lead, n_query, n_key = x.shape
    padded = F.pad(x, (1, 0)).view(*lead, n_key + 1, n_query)
    return padded[..., 1:, :].reshape(*lead, n_query, n_key)


def causal_mask(n_query: int, n_mem: int, device: torch.device) -> Tensor:
    """(L, K) True where key j lies after query i (j > M + i): those scores are removed."""
    keys = torch.arange(n_mem + n_query, device=device)
    queries = torch.arange(n_query, device=device)
    return keys[None, :] > n_mem + queries[:, None]


# ------------------------------------------------------------------------------------------------
# f(z, x): one Transformer-XL layer
# ------------------------------------------------------------------------------------------------


class RelativeSelfAttention(nn.Module):
    """Multi-head attention with Transformer-XL relative positions and the input injection.

    Scores are ``(q + r_w_bias)·k`` (content) plus ``(q + r_r_bias)·r_{i-j}`` (position), with
    learnable biases shared by all positions. Dropout masks are variational: the attention one is
    element-wise and the hidden one is locked over time, each drawn once per DEQ forward, so every
    solver step sees the same f.
    """

    def __init__(
        self,
        d_model: int,
        n_head: int,
        d_head: int,
        dropout: float,
        dropatt: float,
        pre_lnorm: bool,
    ) -> None:
        super().__init__()
        self.n_head, self.d_head, self.pre_lnorm = n_head, d_head, pre_lnorm
        self.scale = 1.0 / math.sqrt(d_head)
        self.qkv = nn.Linear(d_model, 3 * n_head * d_head, bias=False)
        self.pos = nn.Linear(d_model, n_head * d_head, bias=False)
        self.out = nn.Linear(n_head * d_head, d_model)
        self.r_w_bias = nn.Parameter(torch.empty(n_head, d_head))
        self.r_r_bias = nn.Parameter(torch.empty(n_head, d_head))
        self.drop_attn = VariationalDropout(dropatt)
        self.drop = VariationalDropout(dropout, shared_dims=(1,))

    def position_keys(self, pos: Tensor) -> Tensor:
        """(K, d) position embeddings -> (H, K, D) keys; the same for every solver step."""
        return self.pos(pos).view(pos.shape[0], self.n_head, self.d_head).transpose(0, 1)

    def memory_kv(self, z: Tensor, u: Tensor | None = None) -> Tensor:
        """(B, M, 2*H*D) keys and values of the memory positions ``z`` (with their injection
        ``u``, if any): fixed during a solve, so computed once per forward, not per step."""
        h = layer_norm(z) if self.pre_lnorm else z
        kv = self.qkv(h)[..., self.n_head * self.d_head :]
        return kv if u is None else kv + u[..., self.n_head * self.d_head :]

    def forward(self, z: Tensor, injection: Tensor | None, ctx: AttentionContext) -> Tensor:
        (B, L, _), H, D = z.shape, self.n_head, self.d_head
        h = layer_norm(z) if self.pre_lnorm else z
        qkv = self.qkv(h)
        q, k, v = (qkv if injection is None else qkv + injection).chunk(3, dim=-1)
        mem_k, mem_v = ctx.mem_kv.chunk(2, dim=-1)
        q = q.view(B, L, H, D).transpose(1, 2)  # (B, H, L, D)
        k = torch.cat([mem_k, k], dim=1).view(B, -1, H, D).transpose(1, 2)  # (B, H, K, D)
        v = torch.cat([mem_v, v], dim=1).view(B, -1, H, D).transpose(1, 2)
        content = (q + self.r_w_bias[:, None]) @ k.transpose(-1, -2)  # (B, H, L, K)
        position = rel_shift((q + self.r_r_bias[:, None]) @ ctx.pos_keys.transpose(-1, -2))
        scores = ((content + position) * self.scale).masked_fill(ctx.mask, float("-inf"))
        attn = self.drop_attn(scores.softmax(dim=-1))
        a = (attn @ v).transpose(1, 2).reshape(B, L, H * D)
        out = self.drop(self.out(a))
        return z + out if self.pre_lnorm else layer_norm(z + out)


class PositionwiseFF(nn.Module):
    def __init__(self, d_model: int, d_inner: int, dropout: float, pre_lnorm: bool) -> None:
        super().__init__()
        self.pre_lnorm = pre_lnorm
        self.ff1 = nn.Linear(d_model, d_inner)
        self.ff2 = nn.Linear(d_inner, d_model)
        self.drop1 = VariationalDropout(dropout, shared_dims=(1,))
        self.drop2 = VariationalDropout(dropout, shared_dims=(1,))

    def forward(self, z: Tensor) -> Tensor:
        h = layer_norm(z) if self.pre_lnorm else z
        out = self.drop2(self.ff2(self.drop1(F.relu(self.ff1(h)))))
        return z + out if self.pre_lnorm else layer_norm(z + out)


class DEQTransformerLayer(nn.Module):
    """f: (B, L, d) -> (B, L, d), given the segment's injection (B, L, 3*H*D) and its
    :class:`AttentionContext` (both fixed during a solve)."""

    def __init__(
        self,
        d_model: int,
        n_head: int,
        d_head: int,
        d_inner: int,
        dropout: float,
        dropatt: float,
        pre_lnorm: bool,
    ) -> None:
        super().__init__()
        self.attn = RelativeSelfAttention(d_model, n_head, d_head, dropout, dropatt, pre_lnorm)
        self.ff = PositionwiseFF(d_model, d_inner, dropout, pre_lnorm)

    def forward(self, z: Tensor, injection: Tensor | None, ctx: AttentionContext) -> Tensor:
        return self.ff(self.attn(z, injection, ctx))


# ------------------------------------------------------------------------------------------------
# The language model
# ------------------------------------------------------------------------------------------------


class TransformerLM(nn.Module):
    """What the DEQ-Transformer and its layered twin share: the (adaptive) embedding and tied
    softmax, the variational input/position/output dropout, the memory length, the layer sizes,
    the input checks and the read-out. Subclasses say how the hidden sequence is computed and take
    these arguments by keyword, so one config builds either (defaults: the thesis's WT103 run).

    ``adaptive`` selects the adaptive embedding/softmax with ``cutoffs`` and ``div_val`` (the
    thesis's WikiText-103 setting); otherwise a plain softmax, right for small vocabularies.
    ``tie_weights`` shares the input embedding with the output layer. ``mem_len`` positions are
    kept (``eval_mem_len`` in eval mode: the thesis evaluates with a longer memory; both are plain
    attributes that may be changed between calls).
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        n_head: int,
        d_head: int,
        d_inner: int,
        mem_len: int = 150,  # wt103_deq_transformer.sh --mem_len 150
        eval_mem_len: int | None = None,
        dropout: float = 0.05,  # wt103_deq_transformer.sh --dropout 0.05
        dropatt: float = 0.0,  # wt103_deq_transformer.sh --dropatt 0.0
        pre_lnorm: bool = False,
        adaptive: bool = False,
        cutoffs: list[int] = WT103_CUTOFFS,
        div_val: int = 4,
        d_embed: int | None = None,
        tie_weights: bool = True,
        init_std: float = 0.01,  # wt103_deq_transformer.sh --init normal --init_std 0.01
    ) -> None:
        super().__init__()
        cutoffs = list(cutoffs) if adaptive else []
        check_config(vocab_size, d_model, mem_len, eval_mem_len, cutoffs)
        self.vocab_size, self.d_model, self.pre_lnorm = vocab_size, d_model, pre_lnorm
        self.n_head, self.d_head, self.init_std = n_head, d_head, init_std
        self.mem_len = mem_len
        self.eval_mem_len = mem_len if eval_mem_len is None else eval_mem_len
        self._layer_args = (d_model, n_head, d_head, d_inner, dropout, dropatt, pre_lnorm)

        def embedding() -> AdaptiveEmbedding:
            d = d_embed or d_model
            return AdaptiveEmbedding(vocab_size, d, d_model, cutoffs, div_val, init_std)

        self.embedding = embedding()
        self.softmax = AdaptiveLogSoftmax(self.embedding if tie_weights else embedding())
        self.input_drop = VariationalDropout(dropout, shared_dims=(1,))
        self.pos_drop = VariationalDropout(dropout, shared_dims=(0,))
        self.output_drop = VariationalDropout(dropout, shared_dims=(1,))

    def new_layer(self) -> DEQTransformerLayer:
        """A Transformer-XL layer of this model's sizes, default-initialised (see
        :meth:`_init_linear`)."""
        return DEQTransformerLayer(*self._layer_args)

    @staticmethod
    def _init_linear(modules: list[nn.Module], std: float) -> None:
        for m in modules:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        # The reference draws the relative-attention biases from U(-0.05, 0.05).
        for m in modules:
            if isinstance(m, RelativeSelfAttention):
                for p in (m.r_w_bias, m.r_r_bias):
                    nn.init.uniform_(p, -0.05, 0.05)

    def _keep(self, old: Tensor, new: Tensor) -> Tensor:
        """The last ``mem_len`` (``eval_mem_len`` in eval) positions of ``[old; new]``, detached."""
        keep = self.mem_len if self.training else self.eval_mem_len
        both = torch.cat([old, new.detach()], 1)
        return both[:, both.shape[1] - min(keep, both.shape[1]) :]

    def _positions(self, M: int, L: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        return self.pos_drop(sinusoid_positions(M + L, self.d_model, device, dtype))

    def _read_out(self, z: Tensor, targets: Tensor | None, mems: object) -> LMOutput:
        return LMOutput(*self.softmax(self.output_drop(z), targets), z, mems)

    def _check_tokens(self, tokens: Tensor, targets: Tensor | None) -> None:
        check_tokens(tokens, targets, self.vocab_size)


class DEQTransformerLM(TransformerLM):
    """Word-level language model whose hidden sequence is the equilibrium of one Transformer-XL
    layer.

    ``forward(tokens (B, L), targets (B, L) | None, mems) -> ModelOutput(LMOutput, DEQStats)``.
    Pass the returned ``mems`` to the next segment of the same streams; pass ``None`` to start new
    streams. Takes :class:`TransformerLM`'s arguments and ``deq``, the solver settings
    (:class:`~deq_lightning.deq.DEQ` kwargs); shallow unrolled pre-training is
    ``deq_override(model, backward="unrolled", backward_opts={"steps": n})``.
    """

    # The weight-tied module f applies (task.compile=true compiles it; see tasks/base.py).
    equilibrium_cell = "layer"

    def __init__(self, *, deq: dict | None = None, **lm: Any) -> None:
        super().__init__(**lm)
        self.inject = nn.Linear(self.d_model, 3 * self.n_head * self.d_head)
        self.layer = self.new_layer()
        self._init_linear([self.inject, *self.layer.modules()], self.init_std)
        apply_weight_norm(self.layer)
        self.deq = DEQ(**(deq or {}))

    def init_memory(self, batch: int, device: torch.device | None = None) -> Memory:
        """Empty memory (M = 0) for ``batch`` new streams."""
        dtype = self.inject.weight.dtype
        d_inj = self.inject.out_features
        return Memory(
            torch.zeros(batch, 0, self.d_model, device=device, dtype=dtype),
            torch.zeros(batch, 0, d_inj, device=device, dtype=dtype),
        )

    def forward(
        self, tokens: Tensor, targets: Tensor | None = None, mems: Memory | None = None
    ) -> ModelOutput:
        self._check_inputs(tokens, targets, mems)
        B, L = tokens.shape
        mems = self.init_memory(B, tokens.device) if mems is None else mems
        u = self.inject(self.input_drop(self.embedding(tokens)))  # (B, L, 3HD)
        M = mems.z.shape[1]
        pos = self._positions(M, L, tokens.device, u.dtype)
        attn = self.layer.attn
        ctx = AttentionContext(
            attn.memory_kv(mems.z, mems.u),
            attn.position_keys(pos),
            causal_mask(L, M, tokens.device),
        )

        def f(z: Tensor, index: Tensor | None = None) -> Tensor:
            # ``index``: batch compaction (the DEQ solves only the rows still unconverged)
            if index is None:
                return self.layer(z, u, ctx)
            return self.layer(z, u[index], ctx._replace(mem_kv=ctx.mem_kv[index]))

        z, stats = self.deq(f, torch.zeros(B, L, self.d_model, device=u.device, dtype=u.dtype))
        new_mems = Memory(self._keep(mems.z, z), self._keep(mems.u, u))
        return ModelOutput(self._read_out(z, targets, new_mems), stats)

    def _check_inputs(self, tokens: Tensor, targets: Tensor | None, mems: Memory | None) -> None:
        self._check_tokens(tokens, targets)
        if mems is not None:
            B, d_inj = tokens.shape[0], self.inject.out_features
            z, u = mems
            if (
                z.dim() != 3
                or z.shape[0] != B
                or z.shape[2] != self.d_model
                or u.shape != (*z.shape[:2], d_inj)
            ):
                raise ValueError(
                    f"mems must be Memory(z (B, M, {self.d_model}), u (B, M, {d_inj})) for "
                    f"B={B} streams, got z {tuple(z.shape)}, u {tuple(u.shape)}; pass the mems "
                    f"returned for the previous segment of the same batch, or None to start"
                )


# ------------------------------------------------------------------------------------------------
# The layered twin: Transformer-XL
# ------------------------------------------------------------------------------------------------


class LayeredTransformerLM(TransformerLM):
    """The DEQ-Transformer's explicit twin: ``depth`` copies of the same layer, stacked.

    Transformer-XL exactly as the DEQ-Transformer reuses it: the embedding is the first hidden
    sequence, each layer (:class:`DEQTransformerLayer`, with no input injection) maps the hidden
    sequence to the next, and every layer attends to its own memory (its input over the previous
    ``mem_len`` positions, detached). Width, memory, dropout, weight norm and the (adaptive)
    softmax are the DEQ's (:class:`TransformerLM`'s arguments), so the two differ only in depth
    and weight sharing: give the same config and ``depth``. ``tie_layers=True`` shares one layer's
    weights across the stack (a weight-tied network unrolled ``depth`` times, with
    Transformer-XL's per-layer memory).

    ``forward(tokens, targets, mems) -> ModelOutput(LMOutput, None)``; ``mems`` is a tuple of
    ``depth`` tensors (B, M, d).
    """

    def __init__(
        self, *, depth: int = 2, tie_layers: bool = False, weight_norm: bool = True, **lm: Any
    ) -> None:
        super().__init__(**lm)
        if depth < 1:
            raise ValueError(f"model.depth must be >= 1 layer, got {depth}")
        self.depth = depth

        def layer() -> DEQTransformerLayer:
            new = self.new_layer()
            self._init_linear(list(new.modules()), self.init_std)
            return apply_weight_norm(new) if weight_norm else new

        shared = layer() if tie_layers else None
        self.layers = nn.ModuleList(shared or layer() for _ in range(depth))

    def init_memory(self, batch: int, device: torch.device | None = None) -> tuple[Tensor, ...]:
        dtype = self.embedding.tables[0].weight.dtype
        return tuple(
            torch.zeros(batch, 0, self.d_model, device=device, dtype=dtype)
            for _ in range(self.depth)
        )

    def forward(
        self,
        tokens: Tensor,
        targets: Tensor | None = None,
        mems: tuple[Tensor, ...] | None = None,
    ) -> ModelOutput:
        self._check_tokens(tokens, targets)
        B, L = tokens.shape
        mems = self.init_memory(B, tokens.device) if mems is None else tuple(mems)
        if len(mems) != self.depth or any(
            m.dim() != 3 or m.shape[0] != B or m.shape[2] != self.d_model for m in mems
        ):
            raise ValueError(
                f"mems must be {self.depth} tensors (B={B}, M, {self.d_model}), one per layer; "
                "pass the mems returned for the previous segment of the same batch, or None"
            )
        z = self.input_drop(self.embedding(tokens))
        M = mems[0].shape[1]
        pos = self._positions(M, L, tokens.device, z.dtype)
        mask = causal_mask(L, M, tokens.device)
        new_mems = []
        for layer, mem in zip(self.layers, mems):
            new_mems.append(self._keep(mem, z))
            attn = layer.attn
            z = layer(z, None, AttentionContext(attn.memory_kv(mem), attn.position_keys(pos), mask))
        return ModelOutput(self._read_out(z, targets, tuple(new_mems)), None)


def check_config(
    vocab_size: int, d_model: int, mem_len: int, eval_mem_len: int | None, cutoffs: list[int]
) -> None:
    check_vocab(vocab_size, cutoffs)
    if d_model % 2:
        raise ValueError(f"model.d_model must be even (sinusoidal positions), got {d_model}")
    for name, value in (("mem_len", mem_len), ("eval_mem_len", eval_mem_len)):
        if value is not None and value < 0:
            raise ValueError(f"model.{name} must be >= 0, got {value}")
