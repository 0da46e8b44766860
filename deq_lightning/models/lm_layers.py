"""What the two language models (DEQ-Transformer, DEQ-TrellisNet) share, in one place.

Their output type, the adaptive input embedding and the tied (adaptive) softmax read-out, and the
checks of a vocabulary and of a batch of tokens: both LM families use them, and the LM task,
``generate.py`` and ``eval.py`` rely on the two reading out alike.
"""

from __future__ import annotations

import math
from itertools import pairwise
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LMOutput(NamedTuple):
    """``nll`` (B, L): per-token negative log-likelihood in nats (when targets are given);
    ``log_probs`` (B, L, V): log-probabilities of the next token (when they are not);
    ``hidden`` (B, L, d): the equilibrium z*; ``mems``: the family's memory for the next segment
    (``Memory`` of the DEQ-Transformer, ``History`` of the DEQ-TrellisNet)."""

    nll: Tensor | None
    log_probs: Tensor | None
    hidden: Tensor
    mems: Any


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

    def forward(self, h: Tensor, targets: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        """(B, L, d_model) -> ``(nll (B, L), None)`` given targets, else ``(None, log_probs
        (B, L, V))``: the read-out both language models share."""
        B, L, _ = h.shape
        flat = h.reshape(B * L, -1)
        if targets is None:
            return None, self.log_prob(flat).view(B, L, -1)
        return self.nll(flat, targets.reshape(-1)).view(B, L), None

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


def check_vocab(vocab_size: int, cutoffs: list[int]) -> None:
    """A vocabulary of at least two words, and adaptive-softmax cutoffs strictly inside it."""
    if vocab_size < 2:
        raise ValueError(f"model.vocab_size must be >= 2, got {vocab_size}")
    bounds = [0, *cutoffs, vocab_size]
    if any(a >= b for a, b in pairwise(bounds)):
        raise ValueError(
            f"cutoffs {cutoffs} must increase and lie strictly between 0 and "
            f"vocab_size={vocab_size}; for a small vocabulary set model.adaptive=false"
        )


__all__ = ["AdaptiveEmbedding", "AdaptiveLogSoftmax", "LMOutput", "check_tokens", "check_vocab"]
