"""Word-level corpora: the vocabulary (``<eos>`` first, then words by decreasing training
frequency), tokenisation (every line ends with ``<eos>``), words unseen in training (an error, or
mapped to ``<unk>`` by ``data.unk_policy``), and the encoded corpus cached by content hash.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from array import array
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

EOS = "<eos>"
UNK = "<unk>"
SPLITS = ("train", "valid", "test")
# What to do with a valid/test (or prompt) word that the training split never uses.
UNK_POLICIES = ("error", "map")
# Bump when tokenisation or the cache format changes: old caches are then ignored.
CACHE_VERSION = 2


class UnknownTokenError(ValueError):
    """A valid/test (or prompt) word that the training split never uses, under
    ``unk_policy="error"`` (or with no ``<unk>`` to map it to)."""


def check_unk_policy(policy: str) -> str:
    """``policy`` if it is one of :data:`UNK_POLICIES`; a typo must not fall back to a default."""
    if policy not in UNK_POLICIES:
        raise ValueError(
            f"data.unk_policy must be one of {', '.join(map(repr, UNK_POLICIES))}, got {policy!r}: "
            f"'error' stops at a valid/test word that the training split never uses, 'map' "
            f"replaces such words with {UNK} (added to the vocabulary if missing)"
        )
    return policy


# ------------------------------------------------------------------------------------------------
# Vocabulary and corpus
# ------------------------------------------------------------------------------------------------


@dataclass
class UnseenWords:
    """The words of a text that the training vocabulary lacks: counted, never mapped silently."""

    counts: Counter[str] = field(default_factory=Counter)  # word -> tokens, first seen first
    first_line: int = 0  # line of the first unseen word (0: none)

    @property
    def tokens(self) -> int:
        return sum(self.counts.values())

    @property
    def first_word(self) -> str:
        return next(iter(self.counts))

    def examples(self, n: int = 5) -> list[str]:
        """The ``n`` most frequent unseen words (ties: first seen first)."""
        return [w for w, _ in self.counts.most_common(n)]

    def stats(self, n_tokens: int) -> dict:
        """What ``unk_stats`` records for a split of ``n_tokens`` tokens (``<eos>`` included)."""
        n = self.tokens
        return {
            "unseen_tokens": n,
            "tokens": n_tokens,
            "percent": 100.0 * n / n_tokens if n_tokens else 0.0,
            "unseen_types": len(self.counts),
            "examples": self.examples(),
        }


class Vocab:
    """Words <-> ids, built from the training split.

    A word that the training split never uses is never mapped to ``<unk>`` silently: encoding
    counts such words, and ``unk_policy`` says whether they are an error or become ``<unk>``.
    A literal ``<unk>`` is an ordinary word when the training split has it (WikiText, PTB).
    """

    def __init__(self, words: list[str]) -> None:
        self.words = list(words)
        self.index = {w: i for i, w in enumerate(self.words)}
        self.unk = self.index.get(UNK)

    def __len__(self) -> int:
        return len(self.words)

    def with_unk(self) -> Vocab:
        """This vocabulary with ``<unk>`` appended at the end if missing: training words keep
        their ids, so the frequency order the adaptive softmax's cutoffs assume still holds."""
        return self if self.unk is not None else Vocab([*self.words, UNK])

    def _encode_lines(self, lines: Iterable[str], ids: array) -> UnseenWords:
        """Append each line's ids and ``<eos>`` to ``ids``. Unseen words get ``<unk>``'s id, or
        ``len(self)`` (the id :meth:`with_unk` gives it) when there is none yet; the caller
        decides from the returned counts whether that stands."""
        index, unseen = self.index, UnseenWords()
        unk = self.unk if self.unk is not None else len(self.words)
        for lineno, line in enumerate(lines, 1):
            words = line.split()
            try:
                ids.extend([index[w] for w in words])
            except KeyError:
                for w in words:
                    if w not in index:
                        unseen.first_line = unseen.first_line or lineno
                        unseen.counts[w] += 1
                ids.extend([index.get(w, unk) for w in words])
            ids.append(0)
        return unseen

    def encode(self, text: str, where: str = "text", unk_policy: str = "error") -> Tensor:
        """Whitespace-separated words -> (N,) LongTensor; each line break becomes ``<eos>``
        (the inverse of :meth:`decode`: a prompt without a final newline ends mid-sentence).

        Words the vocabulary lacks raise :class:`UnknownTokenError` naming them, unless
        ``unk_policy="map"`` and the vocabulary has ``<unk>``: then they become ``<unk>`` with a
        warning that counts them.
        """
        check_unk_policy(unk_policy)
        ids = array("i")
        unseen = self._encode_lines(text.split("\n"), ids)
        ids.pop()  # the last line has no line break after it
        if unseen.counts:
            where_first = f"{where}, line {unseen.first_line}"
            summary = (
                f"{unseen.tokens} token(s) of words the training split never uses: "
                f"{', '.join(map(repr, unseen.examples(10)))}"
            )
            if unk_policy == "error" or self.unk is None:
                fix = (
                    f"set data.unk_policy=map to map them to {UNK}"
                    if self.unk is not None
                    else f"the vocabulary has no {UNK} to map them to; use training words only"
                )
                raise UnknownTokenError(
                    f"{where_first}: the word {unseen.first_word!r} never occurs in the training "
                    f"split ({summary}). Words are never mapped to {UNK} silently: {fix}."
                )
            warnings.warn(
                f"{where}: {summary}; mapped to {UNK} (data.unk_policy=map)", stacklevel=2
            )
        return torch.tensor(ids, dtype=torch.long)

    def encode_file(self, path: Path) -> tuple[Tensor, UnseenWords]:
        """A text file -> (N,) int32 stream (int32 halves WikiText-103's 103M-token cache) and
        its unseen words (encoded as in :meth:`_encode_lines`)."""
        ids = array("i")
        with open(path, encoding="utf-8") as f:
            unseen = self._encode_lines(f, ids)
        return torch.from_numpy(np.frombuffer(ids, dtype=np.int32)), unseen

    def decode(self, ids: Tensor | list[int]) -> str:
        """Ids -> text; ``<eos>`` becomes a line break (the inverse of reading a file)."""
        lines: list[list[str]] = [[]]
        for i in torch.as_tensor(ids).reshape(-1).tolist():
            if i == 0:
                lines.append([])
            else:
                lines[-1].append(self.words[i])
        return "\n".join(" ".join(line) for line in lines)


@dataclass
class Corpus:
    vocab: Vocab
    splits: dict[str, Tensor]  # split -> (N,) integer token stream
    # valid/test -> UnseenWords.stats(): the words that the training split never uses
    unk_stats: dict[str, dict] = field(default_factory=dict)


def encode_training_split(path: Path) -> tuple[Vocab, Tensor]:
    """Build the vocabulary and encode the training split in one pass over the file.

    Words get ids in order of first occurrence while the file is read; the ids are then renumbered
    by decreasing count (``<eos>`` first, ties by first occurrence), so WikiText-103's 103M
    tokens are read once, not counted and then encoded.
    """
    first_seen = {EOS: 0}
    ids = array("i")
    with open(path, encoding="utf-8") as f:
        for line in f:
            ids.extend([first_seen.setdefault(w, len(first_seen)) for w in line.split()])
            ids.append(0)
    raw = np.frombuffer(ids, dtype=np.int32)
    counts = np.bincount(raw, minlength=len(first_seen))
    counts[0] = np.iinfo(counts.dtype).max
    order = np.argsort(-counts, kind="stable")
    rank = np.empty(order.size, dtype=np.int32)
    rank[order] = np.arange(order.size, dtype=np.int32)
    words = list(first_seen)
    return Vocab([words[i] for i in order]), torch.from_numpy(rank[raw])


def content_hash(paths: list[Path], salt: str = "") -> str:
    """A digest of the files' bytes and ``salt`` (the options that change the encoded corpus)."""
    h = hashlib.blake2b(f"lm-corpus-v{CACHE_VERSION}{salt}".encode(), digest_size=16)
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        h.update(b"\0")  # file boundary
    return h.hexdigest()


def describe_unseen(split: str, stats: dict) -> str:
    """One line for a split's :meth:`UnseenWords.stats` (logged on every run, cached or not)."""
    text = (
        f"{split}: {stats['unseen_tokens']:,} of {stats['tokens']:,} tokens "
        f"({stats['percent']:.3g}%) are words the training split never uses"
    )
    if stats["unseen_types"]:
        examples = ", ".join(map(repr, stats["examples"]))
        text += f" ({stats['unseen_types']:,} distinct, e.g. {examples})"
    return text


class EmptySplitError(ValueError):
    """A split of a text corpus holds (almost) no tokens."""


def check_splits(files: dict[str, Path], splits: dict[str, Tensor]) -> None:
    """Every split needs at least 2 tokens (an input and its target); an empty file is a broken
    download or extraction, not a batch-size problem."""
    for split, stream in splits.items():
        if stream.numel() < 2:
            path = files[split]
            raise EmptySplitError(
                f"{path} holds {stream.numel()} tokens ({path.stat().st_size} bytes): the {split} "
                "split is empty. The file is damaged or was cut short: extract it again from the "
                "dataset's archive (or point data.data_dir at a complete copy). No corpus cache "
                "was written."
            )


def load_text_corpus(files: dict[str, Path], cache_dir: Path, unk_policy: str = "error") -> Corpus:
    """Read (or build and cache) the encoded corpus of ``files`` (split -> path).

    Valid/test words that the training split never uses raise :class:`UnknownTokenError` under
    ``unk_policy="error"`` and become ``<unk>`` under ``"map"`` (``<unk>`` is appended to the
    vocabulary if the training split lacks it); ``Corpus.unk_stats`` counts them either way.
    The cache is keyed by the files' content and the policy, so editing or replacing a file or
    changing the policy rebuilds it; it keeps ``unk_stats``, so a cached run reports the same.
    Encoding WikiText-103 takes a few minutes once; later runs load the cache in seconds.
    """
    check_unk_policy(unk_policy)
    key = content_hash([files[s] for s in SPLITS], salt=f"unk_policy={unk_policy}")
    cache = cache_dir / f"lm-corpus-{key}.pt"
    if cache.is_file():
        try:
            saved = torch.load(cache, weights_only=True)
            splits = {s: saved[s] for s in SPLITS}
            corpus = Corpus(Vocab(saved["vocab"]), splits, saved["unk_stats"])
        except (OSError, RuntimeError, KeyError, EOFError) as e:
            warnings.warn(
                f"ignoring unreadable corpus cache {cache} ({e}); rebuilding it", stacklevel=2
            )
        else:
            try:
                check_splits(files, splits)
            except EmptySplitError:
                cache.unlink(missing_ok=True)  # written by an older version: never reuse it
                raise
            return corpus
    vocab, train = encode_training_split(files["train"])
    splits, unseen = {"train": train}, {}
    for split in ("valid", "test"):
        splits[split], unseen[split] = vocab.encode_file(files[split])
    check_splits(files, splits)  # before anything is cached
    stats = {s: unseen[s].stats(splits[s].numel()) for s in unseen}
    found = [s for s in unseen if unseen[s].counts]
    if found and unk_policy == "error":
        first = unseen[found[0]]
        raise UnknownTokenError(
            f"{files[found[0]]}, line {first.first_line}: the word {first.first_word!r} never "
            f"occurs in the training split ({files['train']}). Counts per split: "
            f"{'; '.join(describe_unseen(s, stats[s]) for s in unseen)}. Words are never mapped "
            f"to {UNK} silently: set data.unk_policy=map to map them to {UNK} (added to the "
            f"vocabulary if missing), or check that the three files belong to the same corpus "
            f"and are unmodified."
        )
    if found:
        vocab = vocab.with_unk()  # the id encode_file gave unseen words when there was no <unk>
    corpus = Corpus(vocab, splits, stats)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp{os.getpid()}")
        torch.save({"vocab": vocab.words, **corpus.splits, "unk_stats": stats}, tmp)
        os.replace(tmp, cache)  # atomic: a concurrent reader never sees half a file
    except OSError as e:
        warnings.warn(
            f"could not write the corpus cache {cache} ({e}); the corpus will be encoded again "
            f"next time. Set data.cache_dir to a writable folder to keep it.",
            stacklevel=2,
        )
    return corpus
