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
from itertools import pairwise
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deq_lightning.deq import DEQ, DEQStats, VariationalDropout, apply_weight_norm

# Adaptive softmax of WikiText-103 (Transformer-XL, kept by the DEQ-Transformer:
# deq:DEQ-Sequence/wt103_deq_transformer.sh, --adaptive --div_val 4, cutoffs 20000,40000,200000).
WT103_CUTOFFS = (20000, 40000, 200000)


class Memory(NamedTuple):
    """What a segment leaves for the next one: its equilibrium ``z`` (B, M, d) and its injection
    ``u`` (B, M, 3*H*D), both detached. The keys/values of memory positions are rebuilt from them
    exactly as they were inside the previous solve."""

    z: Tensor
    u: Tensor


class LMOutput(NamedTuple):
    """``nll`` (B, L): per-token negative log-likelihood in nats (when targets are given);
    ``log_probs`` (B, L, V): log-probabilities of the next token (when they are not);
    ``hidden`` (B, L, d): the equilibrium z*; ``mems``: the memory for the next segment."""

    nll: Tensor | None
    log_probs: Tensor | None
    hidden: Tensor
    mems: Memory


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

    def forward(
        self,
        z: Tensor,
        injection: Tensor | None,
        mem_kv: Tensor,
        pos_keys: Tensor,
        mask: Tensor,
    ) -> Tensor:
        (B, L, _), H, D = z.shape, self.n_head, self.d_head
        h = layer_norm(z) if self.pre_lnorm else z
        qkv = self.qkv(h)
        q, k, v = (qkv if injection is None else qkv + injection).chunk(3, dim=-1)
        mem_k, mem_v = mem_kv.chunk(2, dim=-1)
        q = q.view(B, L, H, D).transpose(1, 2)  # (B, H, L, D)
        k = torch.cat([mem_k, k], dim=1).view(B, -1, H, D).transpose(1, 2)  # (B, H, K, D)
        v = torch.cat([mem_v, v], dim=1).view(B, -1, H, D).transpose(1, 2)
        content = (q + self.r_w_bias[:, None]) @ k.transpose(-1, -2)  # (B, H, L, K)
        position = rel_shift((q + self.r_r_bias[:, None]) @ pos_keys.transpose(-1, -2))
        scores = ((content + position) * self.scale).masked_fill(mask, float("-inf"))
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
    """f: (B, L, d) -> (B, L, d), given the segment's injection (B, L, 3*H*D), the memory's
    keys/values, the position keys and the causal mask (all fixed during a solve)."""

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

    def forward(
        self,
        z: Tensor,
        injection: Tensor | None,
        mem_kv: Tensor,
        pos_keys: Tensor,
        mask: Tensor,
    ) -> Tensor:
        return self.ff(self.attn(z, injection, mem_kv, pos_keys, mask))


# ------------------------------------------------------------------------------------------------
# Adaptive input embedding and adaptive softmax with tied weights
# ------------------------------------------------------------------------------------------------


class AdaptiveEmbedding(nn.Module):
    """Word embeddings by frequency cluster (Baevski & Auli 2019, as in Transformer-XL).

    Cluster i holds the words ``[bounds[i], bounds[i+1])`` (the vocabulary is sorted by frequency)
    with ``d_embed // div_val**i`` dimensions, projected up to d_model: rare words get small
    vectors, which keeps WikiText-103's 267k-word table affordable. With no cutoffs it is a plain
    embedding. The tables and projections double as the output weights of
    :class:`AdaptiveLogSoftmax` (tied weights).
    """

    def __init__(
        self,
        vocab_size: int,
        d_embed: int,
        d_model: int,
        cutoffs: list[int],
        div_val: int,
        init_std: float,
    ) -> None:
        super().__init__()
        self.bounds = [0, *cutoffs, vocab_size]
        self.d_model = d_model
        self.scale = math.sqrt(d_model)  # Transformer-XL's emb_scale
        dims = [d_embed // div_val**i for i in range(len(self.bounds) - 1)]
        if min(dims) < 1:
            raise ValueError(
                f"d_embed={d_embed} with div_val={div_val} leaves cluster {dims.index(min(dims))} "
                f"of the adaptive embedding with no dimensions; raise d_embed or lower div_val"
            )
        self.tables = nn.ModuleList(
            nn.Embedding(hi - lo, dim) for lo, hi, dim in zip(self.bounds, self.bounds[1:], dims)
        )
        self.projs = nn.ModuleList(
            nn.Identity() if dim == d_model else nn.Linear(dim, d_model, bias=False) for dim in dims
        )
        for p in self.parameters():
            nn.init.normal_(p, std=init_std)

    def down(self, i: int, h: Tensor) -> Tensor:
        """(N, d_model) -> (N, dim_i): the transpose of cluster i's projection (output side)."""
        proj = self.projs[i]
        return h if isinstance(proj, nn.Identity) else h @ proj.weight

    def forward(self, tokens: Tensor) -> Tensor:
        if len(self.tables) == 1:
            return self.projs[0](self.tables[0](tokens)) * self.scale
        flat = tokens.reshape(-1)
        dtype = self.tables[0].weight.dtype
        emb = torch.zeros(flat.numel(), self.d_model, dtype=dtype, device=flat.device)
        for i, (lo, hi) in enumerate(pairwise(self.bounds)):
            idx = ((flat >= lo) & (flat < hi)).nonzero().squeeze(1)
            emb = emb.index_copy(0, idx, self.projs[i](self.tables[i](flat[idx] - lo)))
        return emb.view(*tokens.shape, -1) * self.scale


class AdaptiveLogSoftmax(nn.Module):
    """log p(word | h) over frequency clusters, on the (tied) weights of an AdaptiveEmbedding.

    The head scores the first cluster's words and one token per tail cluster; a word in tail
    cluster i has ``log p = log p_head(cluster i) + log p_i(word)``, so rare clusters are only
    scored for the targets that fall in them. With no cutoffs this is a plain (tied) softmax.
    """

    def __init__(self, weights: AdaptiveEmbedding) -> None:
        super().__init__()
        self.weights = weights
        bounds = weights.bounds
        self.biases = nn.ParameterList(
            nn.Parameter(torch.zeros(hi - lo)) for lo, hi in pairwise(bounds)
        )
        n_tail, d_head_cluster = len(bounds) - 2, weights.tables[0].embedding_dim
        self.cluster_weight = nn.Parameter(torch.zeros(n_tail, d_head_cluster))
        self.cluster_bias = nn.Parameter(torch.zeros(n_tail))

    def _logits(self, i: int, h: Tensor) -> Tensor:
        return F.linear(self.weights.down(i, h), self.weights.tables[i].weight, self.biases[i])

    def _head_log_probs(self, h: Tensor) -> Tensor:
        words = self._logits(0, h)
        clusters = F.linear(self.weights.down(0, h), self.cluster_weight, self.cluster_bias)
        return torch.cat([words, clusters], dim=-1).log_softmax(dim=-1)

    def log_prob(self, h: Tensor) -> Tensor:
        """(N, d_model) -> (N, V) log-probabilities (every word scored: for sampling)."""
        if len(self.biases) == 1:
            return self._logits(0, h).log_softmax(dim=-1)
        head, n_head = self._head_log_probs(h), self.weights.bounds[1]
        parts = [head[:, :n_head]]
        for i in range(1, len(self.biases)):
            cluster = head[:, n_head + i - 1 : n_head + i]
            parts.append(cluster + self._logits(i, h).log_softmax(dim=-1))
        return torch.cat(parts, dim=-1)

    def nll(self, h: Tensor, target: Tensor) -> Tensor:
        """(N, d_model), (N,) -> (N,) negative log-likelihood of each target."""
        if len(self.biases) == 1:
            return F.cross_entropy(self._logits(0, h), target, reduction="none")
        bounds = self.weights.bounds
        head = self._head_log_probs(h)
        lp = head.gather(1, target.clamp(max=bounds[1] - 1)[:, None]).squeeze(1)
        for i, (lo, hi) in enumerate(pairwise(bounds[1:]), start=1):
            idx = ((target >= lo) & (target < hi)).nonzero().squeeze(1)
            tail = self._logits(i, h[idx]).log_softmax(dim=-1)
            word = tail.gather(1, (target[idx] - lo)[:, None]).squeeze(1)
            lp = lp.index_copy(0, idx, head[idx, bounds[1] + i - 1] + word)
        return -lp


# ------------------------------------------------------------------------------------------------
# The language model
# ------------------------------------------------------------------------------------------------


def check_tokens(tokens: Tensor, targets: Tensor | None, vocab_size: int) -> None:
    """A language model's inputs: (batch, length) ids inside the vocabulary, targets alike."""
    if tokens.dim() != 2 or tokens.dtype != torch.long:
        raise ValueError(
            f"tokens must be a (batch, length) LongTensor, got {tuple(tokens.shape)} {tokens.dtype}"
        )
    if targets is not None and targets.shape != tokens.shape:
        raise ValueError(
            f"targets {tuple(targets.shape)} must have the shape of tokens {tuple(tokens.shape)}"
        )
    for name, t in (("tokens", tokens), ("targets", targets)):
        if t is not None and t.numel() and (t.min() < 0 or t.max() >= vocab_size):
            raise ValueError(
                f"{name} hold ids in [{int(t.min())}, {int(t.max())}] but the model's "
                f"vocabulary has {vocab_size} words; set model.vocab_size to the "
                f"data's vocab_size"
            )


class TransformerLM(nn.Module):
    """What the DEQ-Transformer and its layered twin share: the (adaptive) embedding and tied
    softmax, the variational input/position/output dropout, the memory length, the input checks
    and the read-out. Subclasses say how the hidden sequence is computed."""

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        mem_len: int,
        eval_mem_len: int | None,
        dropout: float,
        adaptive: bool,
        cutoffs: list[int],
        div_val: int,
        d_embed: int | None,
        tie_weights: bool,
        init_std: float,
    ) -> None:
        super().__init__()
        cutoffs = list(cutoffs) if adaptive else []
        check_config(vocab_size, d_model, mem_len, eval_mem_len, cutoffs)
        self.vocab_size, self.d_model = vocab_size, d_model
        self.mem_len = mem_len
        self.eval_mem_len = mem_len if eval_mem_len is None else eval_mem_len

        def embedding() -> AdaptiveEmbedding:
            d = d_embed or d_model
            return AdaptiveEmbedding(vocab_size, d, d_model, cutoffs, div_val, init_std)

        self.embedding = embedding()
        self.softmax = AdaptiveLogSoftmax(self.embedding if tie_weights else embedding())
        self.input_drop = VariationalDropout(dropout, shared_dims=(1,))
        self.pos_drop = VariationalDropout(dropout, shared_dims=(0,))
        self.output_drop = VariationalDropout(dropout, shared_dims=(1,))

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
        B, L, _ = z.shape
        h = self.output_drop(z).reshape(B * L, -1)
        if targets is None:
            return LMOutput(None, self.softmax.log_prob(h).view(B, L, -1), z, mems)
        return LMOutput(self.softmax.nll(h, targets.reshape(-1)).view(B, L), None, z, mems)

    def _check_tokens(self, tokens: Tensor, targets: Tensor | None) -> None:
        check_tokens(tokens, targets, self.vocab_size)


class DEQTransformerLM(TransformerLM):
    """Word-level language model whose hidden sequence is the equilibrium of one Transformer-XL
    layer.

    ``forward(tokens (B, L), targets (B, L) | None, mems) -> (LMOutput, DEQStats)``. Pass the
    returned ``mems`` to the next segment of the same streams; pass ``None`` to start new streams.
    ``mem_len`` positions are kept (``eval_mem_len`` in eval mode: the thesis evaluates with a
    longer memory; both are plain attributes that may be changed between calls).

    ``adaptive`` selects the adaptive embedding/softmax with ``cutoffs`` and ``div_val`` (the
    thesis's WikiText-103 setting); otherwise a plain softmax, right for small vocabularies.
    ``tie_weights`` shares the input embedding with the output layer. ``deq`` configures the
    solver (:class:`~deq_lightning.deq.DEQ` kwargs); shallow unrolled pre-training is
    ``deq_override(model, backward="unrolled", backward_opts={"steps": n})``.
    """

    # The weight-tied module f applies (task.compile=true compiles it; see tasks/base.py).
    equilibrium_cell = "layer"

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
        deq: dict | None = None,
    ) -> None:
        super().__init__(
            vocab_size,
            d_model,
            mem_len,
            eval_mem_len,
            dropout,
            adaptive,
            cutoffs,
            div_val,
            d_embed,
            tie_weights,
            init_std,
        )
        self.pre_lnorm = pre_lnorm
        self.inject = nn.Linear(d_model, 3 * n_head * d_head)
        self.layer = DEQTransformerLayer(
            d_model, n_head, d_head, d_inner, dropout, dropatt, pre_lnorm
        )
        self._init_linear([self.inject, *self.layer.modules()], init_std)
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
    ) -> tuple[LMOutput, DEQStats]:
        self._check_inputs(tokens, targets, mems)
        B, L = tokens.shape
        mems = self.init_memory(B, tokens.device) if mems is None else mems
        u = self.inject(self.input_drop(self.embedding(tokens)))  # (B, L, 3HD)
        M = mems.z.shape[1]
        pos = self._positions(M, L, tokens.device, u.dtype)
        attn = self.layer.attn
        pos_keys, mem_kv = attn.position_keys(pos), attn.memory_kv(mems.z, mems.u)
        mask = causal_mask(L, M, tokens.device)

        def f(z: Tensor, index: Tensor | None = None) -> Tensor:
            # ``index``: batch compaction (the DEQ solves only the rows still unconverged)
            if index is None:
                return self.layer(z, u, mem_kv, pos_keys, mask)
            return self.layer(z, u[index], mem_kv[index], pos_keys, mask)

        z, stats = self.deq(f, torch.zeros(B, L, self.d_model, device=u.device, dtype=u.dtype))
        new_mems = Memory(self._keep(mems.z, z), self._keep(mems.u, u))
        return self._read_out(z, targets, new_mems), stats

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
    softmax are the DEQ's, so the two differ only in depth and weight sharing: give the same
    config and ``depth``. ``tie_layers=True`` shares one layer's weights across the stack (a
    weight-tied network unrolled ``depth`` times, with Transformer-XL's per-layer memory).

    ``forward(tokens, targets, mems) -> (LMOutput, None)``; ``mems`` is a tuple of ``depth``
    tensors (B, M, d).
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        n_head: int,
        d_head: int,
        d_inner: int,
        depth: int = 2,
        tie_layers: bool = False,
        mem_len: int = 150,
        eval_mem_len: int | None = None,
        dropout: float = 0.05,
        dropatt: float = 0.0,
        pre_lnorm: bool = False,
        adaptive: bool = False,
        cutoffs: list[int] = WT103_CUTOFFS,
        div_val: int = 4,
        d_embed: int | None = None,
        tie_weights: bool = True,
        init_std: float = 0.01,
        weight_norm: bool = True,
    ) -> None:
        super().__init__(
            vocab_size,
            d_model,
            mem_len,
            eval_mem_len,
            dropout,
            adaptive,
            cutoffs,
            div_val,
            d_embed,
            tie_weights,
            init_std,
        )
        if depth < 1:
            raise ValueError(f"model.depth must be >= 1 layer, got {depth}")
        self.depth, self.pre_lnorm = depth, pre_lnorm

        def layer() -> DEQTransformerLayer:
            new = DEQTransformerLayer(d_model, n_head, d_head, d_inner, dropout, dropatt, pre_lnorm)
            self._init_linear(list(new.modules()), init_std)
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
    ) -> tuple[LMOutput, None]:
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
            z = layer(z, None, attn.memory_kv(mem), attn.position_keys(pos), mask)
        return self._read_out(z, targets, tuple(new_mems)), None


def check_config(
    vocab_size: int, d_model: int, mem_len: int, eval_mem_len: int | None, cutoffs: list[int]
) -> None:
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
    if d_model % 2:
        raise ValueError(f"d_model must be even (sinusoidal positions), got {d_model}")
    for name, value in (("mem_len", mem_len), ("eval_mem_len", eval_mem_len)):
        if value is not None and value < 0:
            raise ValueError(f"model.{name} must be >= 0, got {value}")
    bounds = [0, *cutoffs, vocab_size]
    if any(a >= b for a, b in pairwise(bounds)):
        raise ValueError(
            f"cutoffs {cutoffs} must increase and lie strictly between 0 and "
            f"vocab_size={vocab_size}; for a small vocabulary set model.adaptive=false"
        )
