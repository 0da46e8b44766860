"""Word-level language-modelling data: WikiText-103, WikiText-2, PTB and an embedded synthetic
language whose entropy rate is known exactly.

All of them share one pipeline. A corpus is three token streams (train/valid/test) over a
vocabulary built from the training split: ``<eos>`` first, then the words by decreasing frequency
(the order the adaptive softmax's cutoffs assume); every line ends with ``<eos>``, blank lines
included (Transformer-XL's tokenisation). A stream is cut into ``batch_size`` contiguous rows and
read left to right in segments of ``tgt_len`` tokens (truncated BPTT), so each row of a batch
continues the same row of the previous batch and the model's memory of that row stays meaningful.
Under DDP each rank reads its own contiguous block of rows. Evaluation reads the valid/test streams
the same way: perplexity is ``exp(sum of NLL / number of tokens)`` over all ranks and segments.

The task resets the memory at the first batch of every pass over a split (``batch_idx == 0``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from deq_lightning.datamodules.common import DatasetLayoutError, per_device_batch_size
from deq_lightning.datamodules.language_corpus import (
    EOS,
    SPLITS,
    UNK,
    Corpus,
    EmptySplitError,
    UnknownTokenError,
    Vocab,
    check_unk_policy,
    describe_unseen,
    load_text_corpus,
)

# ------------------------------------------------------------------------------------------------
# Ordered BPTT batches
# ------------------------------------------------------------------------------------------------


class OrderedSegments(IterableDataset):
    """One rank's BPTT batches of a token stream: ``(inputs, targets)``, both (B, L) long.

    The stream is cut into ``rows`` (the global batch) contiguous rows of equal length; this rank
    owns rows ``[rank * B, (rank + 1) * B)`` with ``B = rows / world``. Batch ``k`` holds columns
    ``[k * tgt_len, (k + 1) * tgt_len)`` of those rows (the last one may be shorter) and targets
    are the inputs shifted by one token. Iterable (not map-style) so that no sampler can reorder
    or re-shard it; every rank gets the same number of batches.
    """

    def __init__(
        self, stream: Tensor, rows: int, tgt_len: int, rank: int = 0, world: int = 1, name: str = ""
    ) -> None:
        super().__init__()
        if tgt_len < 1:
            raise ValueError(f"tgt_len must be >= 1, got {tgt_len}")
        if rows < 1 or rows % world:
            raise ValueError(f"{rows} rows cannot be split evenly over {world} processes")
        per_rank = rows // world
        length = stream.numel() // rows
        if length < 2:
            raise ValueError(
                f"the {name or 'token'} stream has {stream.numel()} tokens: too few for {rows} "
                f"rows of at least 2 tokens; lower the number of rows (data.batch_size for "
                f"train, data.eval_batch_size for valid/test)"
            )
        grid = stream[: rows * length].view(rows, length)
        self.data = grid[rank * per_rank : (rank + 1) * per_rank]
        self.tgt_len = tgt_len

    @property
    def n_tokens(self) -> int:
        """Target tokens this rank scores in one pass."""
        return self.data.shape[0] * (self.data.shape[1] - 1)

    def __len__(self) -> int:
        return math.ceil((self.data.shape[1] - 1) / self.tgt_len)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        last = self.data.shape[1] - 1
        for i in range(0, last, self.tgt_len):
            j = min(i + self.tgt_len, last)
            yield self.data[:, i:j].long(), self.data[:, i + 1 : j + 1].long()


# ------------------------------------------------------------------------------------------------
# DataModules
# ------------------------------------------------------------------------------------------------


class LanguageModelDataModule(pl.LightningDataModule):
    """Ordered BPTT loaders over a :class:`Corpus`; subclasses say where the corpus comes from.

    ``batch_size``/``eval_batch_size`` are global numbers of rows (streams read side by side);
    ``tgt_len``/``eval_tgt_len`` are segment lengths. After :meth:`setup`, ``vocab_size`` and
    ``vocab`` describe the vocabulary.
    """

    def __init__(
        self, batch_size: int, eval_batch_size: int, tgt_len: int, eval_tgt_len: int | None
    ) -> None:
        super().__init__()
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value < 1:
                raise ValueError(f"data.{name} must be >= 1, got {value}")
        if tgt_len < 1 or (eval_tgt_len is not None and eval_tgt_len < 1):
            raise ValueError(
                f"data.tgt_len/eval_tgt_len must be >= 1, got {tgt_len}/{eval_tgt_len}"
            )
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.tgt_len = tgt_len
        self.eval_tgt_len = eval_tgt_len or tgt_len
        self.corpus: Corpus | None = None

    def load_corpus(self) -> Corpus:
        raise NotImplementedError

    @property
    def vocab(self) -> Vocab:
        if self.corpus is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() before reading the vocab")
        return self.corpus.vocab

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def setup(self, stage: str | None = None) -> None:
        if self.corpus is None:
            self.corpus = self.load_corpus()

    def segments(self, split: str) -> OrderedSegments:
        """This rank's ordered batches of ``split`` (for loaders, and for tools without Lightning)."""
        self.setup()
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        train = split == "train"
        rows = self.batch_size if train else self.eval_batch_size
        per_device_batch_size(rows, trainer)  # a clear error for a batch not divisible by world
        tgt_len = self.tgt_len if train else self.eval_tgt_len
        return OrderedSegments(self.corpus.splits[split], rows, tgt_len, rank, world, split)

    def _loader(self, split: str) -> DataLoader:
        # Slicing an in-memory tensor costs microseconds; worker processes would break the order.
        return DataLoader(self.segments(split), batch_size=None, num_workers=0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("valid")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")


class TextCorpusDataModule(LanguageModelDataModule):
    """A word-level corpus of three text files in ``data_dir`` (one of ``layouts``)."""

    name = "text corpus"
    layouts: tuple[str, ...] = ("{split}.txt",)

    def __init__(
        self,
        data_dir: str,
        batch_size: int = 56,  # deq:DEQ-Sequence/wt103_deq_transformer.sh --batch_size 56
        eval_batch_size: int = 16,  # deq train_transformer.py: eval batch max(16, n_gpu)
        tgt_len: int = 150,  # wt103_deq_transformer.sh --tgt_len 150
        eval_tgt_len: int | None = None,  # --eval_tgt_len 150 (= tgt_len)
        cache_dir: str | None = None,
        unk_policy: str = "error",
    ) -> None:
        super().__init__(batch_size, eval_batch_size, tgt_len, eval_tgt_len)
        self.save_hyperparameters()
        self.data_dir = Path(data_dir)
        self.cache_dir = Path(cache_dir) if cache_dir else self.data_dir
        self.unk_policy = check_unk_policy(unk_policy)
        # After setup: valid/test -> UnseenWords.stats() (counts of words unseen in training).
        self.unk_stats: dict[str, dict] = {}

    def layout(self) -> str:
        alternatives = [
            "\n".join(f"  {pattern.format(split=s)}" for s in SPLITS) for pattern in self.layouts
        ]
        return f"{self.data_dir}/\n" + "\n  or\n".join(alternatives)

    def files(self) -> dict[str, Path]:
        """The three files of the first complete layout; a clear error when there is none."""
        root = self.data_dir
        if not root.is_dir():
            raise DatasetLayoutError(
                self.name, root, "the folder does not exist", self.layout(), "data.data_dir"
            )
        best: list[Path] = []
        for pattern in self.layouts:
            files = [root / pattern.format(split=s) for s in SPLITS]
            missing = [f for f in files if not f.is_file()]
            if not missing:
                return dict(zip(SPLITS, files))
            if len(missing) < 3 and (not best or len(missing) < len(best)):
                best = missing
        problem = (
            f"missing {', '.join(f.name for f in best)}"
            if best
            else "none of the expected files were found"
        )
        raise DatasetLayoutError(self.name, root, problem, self.layout(), "data.data_dir")

    def prepare_data(self) -> None:
        # Runs once per node before setup: builds the cache that every rank then loads.
        load_text_corpus(self.files(), self.cache_dir, self.unk_policy)

    def load_corpus(self) -> Corpus:
        corpus = load_text_corpus(self.files(), self.cache_dir, self.unk_policy)
        self.unk_stats = corpus.unk_stats
        if getattr(self.trainer, "global_rank", 0) == 0:  # one report per run, not per rank
            self.report_unseen(corpus)
        return corpus

    def report_unseen(self, corpus: Corpus) -> None:
        """Log each split's unseen words on every run (from the cache too): a perplexity over
        ``<unk>`` tokens is not comparable to one without, so the count must never be hidden."""
        log = logging.getLogger(__name__)
        for split, stats in corpus.unk_stats.items():
            line = f"{self.name} {describe_unseen(split, stats)}"
            if stats["unseen_tokens"]:
                log.warning("%s; mapped to %s (data.unk_policy=map)", line, UNK)
            else:
                log.info("%s (data.unk_policy=%s)", line, self.unk_policy)
        if any(s["unseen_tokens"] for s in corpus.unk_stats.values()):
            log.info(
                "%s: %s has id %d of a %d-word vocabulary",
                self.name,
                UNK,
                corpus.vocab.unk,
                len(corpus.vocab),
            )


class WikiText103DataModule(TextCorpusDataModule):
    """WikiText-103 (word level, 267k-word vocabulary). ``wiki.*.tokens`` as unzipped from
    ``wikitext-103-v1.zip``, or ``{train,valid,test}.txt`` as renamed by deq's get_data.sh."""

    name = "WikiText-103"
    layouts = ("wiki.{split}.tokens", "{split}.txt")


class WikiText2DataModule(TextCorpusDataModule):
    """WikiText-2 (word level, 33k words); same layouts as WikiText-103."""

    name = "WikiText-2"
    layouts = ("wiki.{split}.tokens", "{split}.txt")


class PTBDataModule(TextCorpusDataModule):
    """Penn Treebank (Mikolov's 10k-word version): ``ptb.*.txt`` from ``simple-examples/data``, or
    ``{train,valid,test}.txt`` as renamed by deq's get_data.sh (``penn/``)."""

    name = "Penn Treebank"
    layouts = ("ptb.{split}.txt", "{split}.txt")


# ------------------------------------------------------------------------------------------------
# The embedded default: a synthetic language with a known entropy rate
# ------------------------------------------------------------------------------------------------


def pseudo_words(n: int) -> list[str]:
    """``n`` distinct pronounceable two-syllable words (generated text reads like a language)."""
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    n_pairs = len(syllables) ** 2
    if n > n_pairs:
        raise ValueError(f"at most {n_pairs} synthetic words, asked for {n}")
    # 37 is coprime with the number of pairs: i -> 37 i mod n_pairs is a bijection.
    return [
        syllables[j // len(syllables)] + syllables[j % len(syllables)]
        for j in ((37 * i) % n_pairs for i in range(n))
    ]


class MarkovSource:
    """A random sparse order-``order`` Markov language of sentences, with an exact entropy rate.

    A sentence is a sequence of words ended by ``<eos>`` (id 0). The next token depends on the
    last ``order`` tokens *of the current sentence* (padded with id 0 at its start): each such
    context allows ``branching`` random words with Dirichlet(``concentration``) weights, scaled by
    ``1 - eos_prob``, and ends the sentence with probability ``eos_prob`` (never before the first
    word). Sentences are therefore i.i.d., and by the renewal-reward theorem the entropy rate is

        H = sum_c v(c) H(P(. | c)) / sum_c v(c)   nats/token,

    where ``v(c)`` is the expected number of tokens drawn in context ``c`` per sentence. ``v`` is
    the sum of the context distributions at steps 0, 1, 2, ... of a sentence, which lose mass
    ``eos_prob`` per step; the sum is stopped once the remaining mass is below 1e-15 of a sentence
    (the truncation is below float64 resolution). A model that sees the text can reach H; nothing
    can do better on average, so ``exp(H)`` is the perplexity floor.
    """

    def __init__(
        self,
        n_words: int = 24,
        order: int = 2,
        branching: int = 4,
        concentration: float = 1.0,
        eos_prob: float = 0.1,
        seed: int = 0,
    ) -> None:
        if not 1 <= branching <= n_words:
            raise ValueError(f"branching must be in [1, n_words={n_words}], got {branching}")
        if order < 1 or not 0 < eos_prob < 1 or concentration <= 0:
            raise ValueError(
                f"need order >= 1, 0 < eos_prob < 1, concentration > 0; got order={order}, "
                f"eos_prob={eos_prob}, concentration={concentration}"
            )
        self.n_words, self.order, self.eos_prob = n_words, order, eos_prob
        self.base = n_words + 1
        self.n_contexts = self.base**order
        if self.n_contexts > 2_000_000:
            raise ValueError(f"(n_words + 1) ** order = {self.n_contexts} contexts is too many")
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0]))
        successors = rng.random((self.n_contexts, n_words)).argsort(axis=1)[:, :branching] + 1
        weights = rng.dirichlet(np.full(branching, concentration), size=self.n_contexts)
        probs = np.zeros((self.n_contexts, self.base))
        np.put_along_axis(probs, successors, weights * (1 - eos_prob), axis=1)
        probs[:, 0] = eos_prob
        probs[0] = 0.0  # sentence start: a first word is always drawn
        probs[0, successors[0]] = weights[0]
        self.probs = probs
        self.visits = self._expected_visits()

    def next_context(self, ctx: np.ndarray, token: np.ndarray) -> np.ndarray:
        """Most recent token in the lowest digit; ``<eos>`` starts a new sentence (context 0)."""
        return np.where(token == 0, 0, (ctx * self.base + token) % self.n_contexts)

    def _expected_visits(self) -> np.ndarray:
        words = self.probs[:, 1:]
        ctx = np.arange(self.n_contexts)[:, None]
        nxt = ((ctx * self.base + np.arange(1, self.base)[None]) % self.n_contexts).ravel()
        mu = np.zeros(self.n_contexts)
        mu[0] = 1.0
        visits = np.zeros(self.n_contexts)
        while mu.sum() > 1e-15:
            visits += mu
            mu = np.bincount(nxt, weights=(mu[:, None] * words).ravel(), minlength=self.n_contexts)
        return visits

    @property
    def entropy_rate(self) -> float:
        """Exact entropy rate in nats per token (``<eos>`` counts as a token)."""
        p = self.probs
        h = -(p * np.log(np.where(p > 0, p, 1.0))).sum(axis=1)
        return float(self.visits @ h / self.visits.sum())

    @property
    def unigram_entropy(self) -> float:
        """Entropy of the token frequencies: what a model that ignores context can reach."""
        freq = self.visits @ self.probs / self.visits.sum()
        return float(-(freq[freq > 0] * np.log(freq[freq > 0])).sum())

    def sample(self, n_tokens: int, rng: np.random.Generator) -> np.ndarray:
        """``n_tokens`` of text: whole sentences drawn side by side, concatenated, cut at the end."""
        cum = self.probs.cumsum(axis=1)
        cum[:, -1] = 1.0
        mean_len = 1 + 1 / self.eos_prob
        parts, total = [], 0
        while total < n_tokens:
            m = min(20000, int((n_tokens - total) / mean_len * 1.1) + 16)
            ctx = np.zeros(m, dtype=np.int64)
            alive = np.ones(m, dtype=bool)
            cols = []
            while alive.any():
                tok = (cum[ctx] < rng.random(m)[:, None]).sum(axis=1)
                cols.append(np.where(alive, tok, -1))
                alive &= tok != 0
                ctx = self.next_context(ctx, tok)
            grid = np.stack(cols, axis=1)
            parts.append(grid[grid >= 0])  # row-major: sentence after sentence
            total += parts[-1].size
        return np.concatenate(parts)[:n_tokens]

    def log_probs(self, stream: np.ndarray) -> np.ndarray:
        """The true log-probability of each token of a stream that starts a sentence."""
        t = np.arange(stream.size)
        last_eos = np.maximum.accumulate(np.where(stream == 0, t, -1))
        start = np.concatenate([[0], last_eos[:-1] + 1])  # first token of t's sentence
        ctx = np.zeros(stream.size, dtype=np.int64)
        for j in range(1, self.order + 1):
            inside = t - j >= start
            ctx += np.where(inside, stream[np.maximum(t - j, 0)], 0) * self.base ** (j - 1)
        return np.log(self.probs[ctx, stream])


class SyntheticLMDataModule(LanguageModelDataModule):
    """The embedded default: text from a :class:`MarkovSource`, generated from ``seed``.

    Needs no files; ``vocab``/``vocab_size`` are known at once. ``entropy_rate`` (nats/token) and
    ``ppl_floor = exp(entropy_rate)`` are the best any model can do; ``oracle_ppl(split)`` is the
    true model's perplexity on the generated split itself (the floor up to sampling noise).
    """

    def __init__(
        self,
        batch_size: int = 16,
        eval_batch_size: int = 8,
        tgt_len: int = 32,
        eval_tgt_len: int | None = None,
        n_words: int = 24,
        order: int = 2,
        branching: int = 4,
        concentration: float = 1.0,
        eos_prob: float = 0.1,
        train_tokens: int = 1_000_000,
        valid_tokens: int = 20_000,
        test_tokens: int = 20_000,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, tgt_len, eval_tgt_len)
        self.save_hyperparameters()
        self.source = MarkovSource(n_words, order, branching, concentration, eos_prob, seed)
        self.sizes = {"train": train_tokens, "valid": valid_tokens, "test": test_tokens}
        self.seed = seed
        self._vocab = Vocab([EOS, *pseudo_words(n_words)])

    @property
    def vocab(self) -> Vocab:
        return self._vocab

    @property
    def entropy_rate(self) -> float:
        return self.source.entropy_rate

    @property
    def ppl_floor(self) -> float:
        return math.exp(self.entropy_rate)

    def oracle_ppl(self, split: str) -> float:
        self.setup()
        stream = self.corpus.splits[split].numpy()
        return math.exp(-self.source.log_probs(stream).mean())

    def describe(self) -> str:
        s = self.source
        return (
            f"synthetic order-{s.order} Markov language: {self.vocab_size} tokens, entropy rate "
            f"{self.entropy_rate:.4f} nats/token, ideal perplexity {self.ppl_floor:.3f} "
            f"(context-free unigram perplexity {math.exp(s.unigram_entropy):.2f})"
        )

    def load_corpus(self) -> Corpus:
        seeds = np.random.SeedSequence([self.seed, 1]).spawn(len(SPLITS))
        splits = {
            split: torch.from_numpy(
                self.source.sample(self.sizes[split], np.random.default_rng(ss)).astype(np.int32)
            )
            for split, ss in zip(SPLITS, seeds)
        }
        return Corpus(self._vocab, splits)


# Re-exported: callers catch these errors and read the vocabulary from here.
__all__ = [
    "Corpus",
    "EmptySplitError",
    "LanguageModelDataModule",
    "OrderedSegments",
    "PTBDataModule",
    "SyntheticLMDataModule",
    "TextCorpusDataModule",
    "UnknownTokenError",
    "Vocab",
    "WikiText2DataModule",
    "WikiText103DataModule",
]
