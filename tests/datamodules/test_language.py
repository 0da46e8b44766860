import logging
import math
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from deq_lightning.datamodules import language_corpus
from deq_lightning.datamodules.common import DatasetLayoutError
from deq_lightning.datamodules.language import (
    MarkovSource,
    OrderedSegments,
    PTBDataModule,
    SyntheticLMDataModule,
    UnknownTokenError,
    Vocab,
    WikiText2DataModule,
    WikiText103DataModule,
    pseudo_words,
)

# A blank line still ends with <eos>, as in Transformer-XL's WikiText pipeline.
TEXTS = {
    "train": " = Cats = \n\n the cat sat on the mat \n the dog sat \n",
    "valid": " the cat sat \n",
    "test": " the dog \n\n",
}
WORDS = ["<eos>", "the", "=", "sat", "Cats", "cat", "on", "mat", "dog"]


def write(root, pattern, texts=TEXTS):
    root.mkdir(parents=True, exist_ok=True)
    for split, text in texts.items():
        (root / pattern.format(split=split)).write_text(text, encoding="utf-8")
    return root


def ids(*words):
    return [WORDS.index(w) for w in words]


LAYOUTS = [
    (WikiText103DataModule, "wiki.{split}.tokens"),
    (WikiText103DataModule, "{split}.txt"),
    (WikiText2DataModule, "wiki.{split}.tokens"),
    (WikiText2DataModule, "{split}.txt"),
    (PTBDataModule, "ptb.{split}.txt"),
    (PTBDataModule, "{split}.txt"),
]


@pytest.mark.parametrize(("cls", "pattern"), LAYOUTS)
def test_loads_each_real_layout(tmp_path, cls, pattern):
    dm = cls(str(write(tmp_path / "data", pattern)), batch_size=2, eval_batch_size=1, tgt_len=3)
    dm.setup()
    assert dm.vocab.words == WORDS and dm.vocab_size == 9
    assert dm.corpus.splits["train"].tolist() == [
        *ids("=", "Cats", "=", "<eos>", "<eos>"),
        *ids("the", "cat", "sat", "on", "the", "mat", "<eos>", "the", "dog", "sat", "<eos>"),
    ]
    assert dm.corpus.splits["valid"].tolist() == ids("the", "cat", "sat", "<eos>")
    assert dm.corpus.splits["test"].tolist() == ids("the", "dog", "<eos>", "<eos>")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == (2, 3) and x.dtype == torch.long
    (vx, vy), *_ = list(dm.val_dataloader())
    assert vx.tolist() == [ids("the", "cat", "sat")] and vy.tolist() == [ids("cat", "sat", "<eos>")]


def test_missing_folder_and_files_name_the_layout_and_key(tmp_path):
    with pytest.raises(DatasetLayoutError, match=r"does not exist(.|\n)*data\.data_dir"):
        WikiText103DataModule(str(tmp_path / "nowhere")).setup()
    root = write(tmp_path / "wt", "wiki.{split}.tokens", {"train": "a\n", "valid": "a\n"})
    with pytest.raises(DatasetLayoutError) as err:
        WikiText103DataModule(str(root)).setup()
    msg = str(err.value)
    assert "missing wiki.test.tokens" in msg and "wiki.train.tokens" in msg
    assert "train.txt" in msg and "data.data_dir" in msg
    with pytest.raises(DatasetLayoutError, match="none of the expected files"):
        PTBDataModule(str(tmp_path)).setup()


def test_unknown_word_names_file_line_and_token(tmp_path):
    texts = {**TEXTS, "test": "the cat\n the zebra sat\n zebra gnu\n"}
    root = write(tmp_path, "ptb.{split}.txt", texts)
    with pytest.raises(UnknownTokenError, match=r"ptb\.test\.txt, line 2: the word 'zebra'") as err:
        PTBDataModule(str(root), cache_dir=str(tmp_path / "cache")).setup()
    msg = str(err.value)
    assert "data.unk_policy=map" in msg
    assert "valid: 0 of 4 tokens (0%)" in msg
    assert "test: 3 of 10 tokens (30%)" in msg and "2 distinct, e.g. 'zebra', 'gnu'" in msg
    assert not (tmp_path / "cache").exists()  # nothing is cached for a corpus that was refused


# A corpus whose training split has <unk> (as WikiText/PTB): a literal <unk> in valid/test is a
# training word, any other unseen word is still unseen.
UNK_TEXTS = {**TEXTS, "train": TEXTS["train"] + " <unk> <unk> \n", "valid": " the <unk> \n"}
UNK_WORDS = [*WORDS[:4], "<unk>", *WORDS[4:]]  # by count: <unk> (2) after "sat" (2)


def test_error_policy_refuses_unseen_words_even_when_training_has_unk(tmp_path):
    root = write(tmp_path / "unk", "ptb.{split}.txt", {**UNK_TEXTS, "test": " the zebra \n"})
    with pytest.raises(UnknownTokenError, match=r"ptb\.test\.txt, line 1: the word 'zebra'"):
        PTBDataModule(str(root)).setup()
    clean = PTBDataModule(str(write(tmp_path / "clean", "ptb.{split}.txt", UNK_TEXTS)))
    clean.setup()  # the literal <unk> of valid is a training word, not an unseen one
    unk = clean.vocab.index["<unk>"]
    assert clean.vocab.words == UNK_WORDS and clean.vocab.unk == unk == 4
    assert clean.corpus.splits["valid"].tolist() == [UNK_WORDS.index("the"), unk, 0]
    assert clean.unk_stats["valid"]["unseen_tokens"] == 0


def unk_records(caplog):
    return [r for r in caplog.records if r.name == "deq_lightning.datamodules.language"]


def test_map_appends_unk_after_the_training_words_and_logs_the_counts(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="deq_lightning.datamodules.language")
    texts = {**TEXTS, "valid": " the zebra sat gnu \n", "test": " the zebra \n\n"}
    dm = PTBDataModule(str(write(tmp_path, "ptb.{split}.txt", texts)), unk_policy="map")
    dm.setup()
    assert dm.vocab.words == [*WORDS, "<unk>"] and dm.vocab.unk == len(WORDS)
    unk = len(WORDS)
    clean = PTBDataModule(str(write(tmp_path / "clean", "ptb.{split}.txt")))
    clean.setup()
    assert torch.equal(dm.corpus.splits["train"], clean.corpus.splits["train"])  # same ids
    assert dm.corpus.splits["valid"].tolist() == [*ids("the"), unk, *ids("sat"), unk, 0]
    assert dm.corpus.splits["test"].tolist() == [*ids("the"), unk, 0, 0]
    assert dm.unk_stats == {
        "valid": {
            "unseen_tokens": 2,
            "tokens": 5,
            "percent": 40.0,
            "unseen_types": 2,
            "examples": ["zebra", "gnu"],
        },
        "test": {
            "unseen_tokens": 1,
            "tokens": 4,
            "percent": 25.0,
            "unseen_types": 1,
            "examples": ["zebra"],
        },
    }
    warned = [r.getMessage() for r in unk_records(caplog) if r.levelno == logging.WARNING]
    assert len(warned) == 2
    assert "valid: 2 of 5 tokens (40%)" in warned[0] and "'zebra', 'gnu'" in warned[0]
    assert "test: 1 of 4 tokens (25%)" in warned[1]
    assert all("mapped to <unk> (data.unk_policy=map)" in m for m in warned)


def test_map_uses_the_training_unk_without_growing_the_vocabulary(tmp_path):
    texts = {**UNK_TEXTS, "test": " the zebra <unk> \n"}
    dm = PTBDataModule(str(write(tmp_path, "ptb.{split}.txt", texts)), unk_policy="map")
    dm.setup()
    assert dm.vocab.words == UNK_WORDS
    assert dm.corpus.splits["test"].tolist() == [UNK_WORDS.index("the"), 4, 4, 0]
    assert dm.unk_stats["test"]["unseen_tokens"] == 1  # zebra; the literal <unk> is a word
    assert dm.unk_stats["test"]["examples"] == ["zebra"]
    assert dm.unk_stats["valid"]["unseen_tokens"] == 0


@pytest.mark.parametrize("policy", ["error", "map"])
def test_no_unseen_words_are_still_logged_and_recorded(tmp_path, caplog, policy):
    caplog.set_level(logging.INFO, logger="deq_lightning.datamodules.language")
    dm = WikiText2DataModule(str(write(tmp_path, "wiki.{split}.tokens")), unk_policy=policy)
    dm.setup()
    assert dm.vocab.words == WORDS  # map adds <unk> only when a word needs it
    zero = {"unseen_tokens": 0, "percent": 0.0, "unseen_types": 0, "examples": []}
    assert dm.unk_stats == {"valid": {**zero, "tokens": 4}, "test": {**zero, "tokens": 4}}
    lines = [r.getMessage() for r in unk_records(caplog)]
    assert (
        f"WikiText-2 valid: 0 of 4 tokens (0%) are words the training split never uses "
        f"(data.unk_policy={policy})" in lines
    )
    assert any(m.startswith("WikiText-2 test: 0 of 4 tokens (0%)") for m in lines)


def test_only_rank_zero_logs_the_unseen_words(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="deq_lightning.datamodules.language")
    dm = WikiText2DataModule(str(write(tmp_path, "{split}.txt")))
    dm.trainer = SimpleNamespace(global_rank=1, world_size=2)
    dm.setup()
    assert not unk_records(caplog) and dm.unk_stats["valid"]["tokens"] == 4


def test_cache_is_keyed_by_the_policy_and_keeps_the_counts(tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="deq_lightning.datamodules.language")
    texts = {**TEXTS, "test": " the zebra \n"}
    root, cache = write(tmp_path / "data", "{split}.txt", texts), tmp_path / "cache"
    mapped = WikiText2DataModule(str(root), cache_dir=str(cache), unk_policy="map")
    mapped.prepare_data()
    mapped.setup()
    assert len(list(cache.glob("lm-corpus-*.pt"))) == 1
    first_run = [r.getMessage() for r in unk_records(caplog)]
    with pytest.raises(UnknownTokenError, match=r"data\.unk_policy=map"):
        WikiText2DataModule(str(root), cache_dir=str(cache)).setup()  # not served map's cache
    caplog.clear()

    def no_reading(*args):
        raise AssertionError("the cache should have been used")

    with monkeypatch.context() as m:
        m.setattr(Vocab, "encode_file", no_reading)
        m.setattr(language_corpus, "encode_training_split", no_reading)
        again = WikiText2DataModule(str(root), cache_dir=str(cache), unk_policy="map")
        again.setup()
    assert again.vocab.words == [*WORDS, "<unk>"]
    assert again.unk_stats == mapped.unk_stats and again.unk_stats["test"]["unseen_tokens"] == 1
    assert [r.getMessage() for r in unk_records(caplog)] == first_run  # the same report
    (root / "test.txt").write_text(TEXTS["test"])
    for policy in ("error", "map"):
        WikiText2DataModule(str(root), cache_dir=str(cache), unk_policy=policy).setup()
    assert len(list(cache.glob("lm-corpus-*.pt"))) == 3  # one per (content, policy)


def test_bad_unk_policy_is_rejected_at_construction(tmp_path):
    with pytest.raises(ValueError, match=r"data\.unk_policy must be one of 'error', 'map', got"):
        PTBDataModule(str(tmp_path / "not yet downloaded"), unk_policy="Map")
    with pytest.raises(ValueError, match=r"data\.unk_policy"):
        Vocab(WORDS).encode("the cat", unk_policy="ignore")


def test_cache_is_reused_and_keyed_by_content(tmp_path, monkeypatch):
    root = write(tmp_path / "data", "{split}.txt")
    cache = tmp_path / "cache"
    dm = WikiText2DataModule(str(root), cache_dir=str(cache))
    dm.prepare_data()
    assert len(list(cache.glob("lm-corpus-*.pt"))) == 1

    def no_reading(*args):
        raise AssertionError("the cache should have been used")

    with monkeypatch.context() as m:
        m.setattr(Vocab, "encode_file", no_reading)
        m.setattr(language_corpus, "encode_training_split", no_reading)
        again = WikiText2DataModule(str(root), cache_dir=str(cache))
        again.setup()
    assert again.vocab.words == WORDS
    for split in ("train", "valid", "test"):
        assert torch.equal(again.corpus.splits[split], dm.load_corpus().splits[split])
    (root / "train.txt").write_text(TEXTS["train"] + " the zebra \n")
    changed = WikiText2DataModule(str(root), cache_dir=str(cache))
    changed.setup()
    assert "zebra" in changed.vocab.index
    assert len(list(cache.glob("lm-corpus-*.pt"))) == 2


def test_unwritable_cache_warns_and_still_loads(tmp_path):
    root = write(tmp_path / "data", "{split}.txt")
    blocker = tmp_path / "file"
    blocker.write_text("")
    dm = WikiText2DataModule(str(root), cache_dir=str(blocker / "cache"))
    with pytest.warns(UserWarning, match="data.cache_dir"):
        dm.setup()
    assert dm.vocab_size == len(WORDS)


def test_ordered_segments_continue_each_row():
    stream = torch.arange(103, dtype=torch.int32)
    seg = OrderedSegments(stream, rows=4, tgt_len=5)
    batches = list(seg)
    assert len(seg) == len(batches) == 5
    assert [x.shape[1] for x, _ in batches] == [5, 5, 5, 5, 4]
    rows = stream[:100].view(4, 25).long()
    assert torch.equal(torch.cat([x for x, _ in batches], 1), rows[:, :24])
    assert torch.equal(torch.cat([y for _, y in batches], 1), rows[:, 1:])
    assert seg.n_tokens == 4 * 24


def test_each_rank_reads_its_own_contiguous_shard():
    stream = torch.arange(1000, dtype=torch.int32)
    whole = list(OrderedSegments(stream, rows=4, tgt_len=7))
    shards = [list(OrderedSegments(stream, rows=4, tgt_len=7, rank=r, world=2)) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == len(whole)
    for r, shard in enumerate(shards):
        inputs = torch.cat([x for x, _ in shard], 1)
        assert torch.equal(inputs.reshape(-1)[:249], torch.arange(r * 500, r * 500 + 249))
        for (x, y), (wx, wy) in zip(shard, whole):
            assert torch.equal(x, wx[2 * r : 2 * r + 2]) and torch.equal(y, wy[2 * r : 2 * r + 2])


def test_datamodule_shards_by_trainer_rank_and_checks_the_batch(tmp_path):
    dm = SyntheticLMDataModule(batch_size=4, eval_batch_size=2, tgt_len=8, train_tokens=4000)
    dm.trainer = SimpleNamespace(global_rank=1, world_size=2)
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 8)
    assert torch.equal(x[0].int(), dm.corpus.splits["train"][2000:2008])
    dm.trainer = SimpleNamespace(global_rank=0, world_size=3)
    with pytest.raises(ValueError, match="multiple of the world size"):
        dm.train_dataloader()


def test_too_short_split_is_a_clear_error():
    with pytest.raises(ValueError, match="valid stream has 9 tokens"):
        OrderedSegments(torch.arange(9), rows=8, tgt_len=4, name="valid")


def test_vocab_encode_decode_round_trip():
    vocab = Vocab(WORDS)
    for text in ("the cat sat\nthe dog\n", "the cat\n\nthe dog"):
        assert vocab.decode(vocab.encode(text)) == text
    assert vocab.encode(" the  cat ").tolist() == ids("the", "cat")  # a prompt mid-sentence


def test_unknown_prompt_words_are_named_and_never_mapped_silently():
    for policy in ("error", "map"):  # no <unk> in the vocabulary: nothing to map to
        with pytest.raises(UnknownTokenError, match="has no <unk>") as err:
            Vocab(WORDS).encode("the zebra\ngnu zebra", where="prompt", unk_policy=policy)
        assert str(err.value).startswith("prompt, line 1: the word 'zebra'")
        assert "3 token(s) of words the training split never uses: 'zebra', 'gnu'" in str(err.value)
    vocab = Vocab([*WORDS, "<unk>"])
    with pytest.raises(UnknownTokenError, match=r"line 2: the word 'gnu'(.|\n)*unk_policy=map"):
        vocab.encode("the cat\nthe gnu", where="prompt")
    with pytest.warns(UserWarning, match=r"prompt: 3 token\(s\) of words .*'zebra', 'gnu'"):
        mapped = vocab.encode("the zebra\ngnu zebra", where="prompt", unk_policy="map")
    unk = len(WORDS)
    assert mapped.tolist() == [*ids("the"), unk, 0, unk, unk]


# ------------------------------------------------------------------------------------------------
# The synthetic language
# ------------------------------------------------------------------------------------------------


def test_synthetic_entropy_rate_matches_the_closed_form_of_a_deterministic_grammar():
    # branching 1: words are determined by their context, so only the sentence end is random:
    # h(p) per token after the first word, 1 + 1/p tokens per sentence => H = h(p) / (1 + p).
    p = 0.2
    source = MarkovSource(n_words=6, order=2, branching=1, eos_prob=p, seed=3)
    h = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    assert source.entropy_rate == pytest.approx(h / (1 + p), rel=1e-12)


def test_synthetic_entropy_rate_matches_the_oracle_on_a_long_sample():
    source = MarkovSource(n_words=12, order=2, branching=3, eos_prob=0.15, seed=1)
    stream = source.sample(300_000, np.random.default_rng(0))
    log_probs = source.log_probs(stream)
    assert np.isfinite(log_probs).all()  # sampler and scorer agree on every context
    assert -log_probs.mean() == pytest.approx(source.entropy_rate, abs=0.01)
    assert source.entropy_rate < source.unigram_entropy - 0.5  # context carries information


def test_synthetic_datamodule_is_deterministic_and_describes_its_floor():
    a = SyntheticLMDataModule(train_tokens=5000, valid_tokens=1000, test_tokens=1000, seed=4)
    b = SyntheticLMDataModule(train_tokens=5000, valid_tokens=1000, test_tokens=1000, seed=4)
    c = SyntheticLMDataModule(train_tokens=5000, valid_tokens=1000, test_tokens=1000, seed=5)
    assert a.vocab_size == 25 and a.vocab.words[1:3] == pseudo_words(2)  # known before setup
    a.setup(), b.setup(), c.setup()
    for split in ("train", "valid", "test"):
        assert torch.equal(a.corpus.splits[split], b.corpus.splits[split])
        assert a.corpus.splits[split].numel() == {"train": 5000}.get(split, 1000)
    assert not torch.equal(a.corpus.splits["train"], c.corpus.splits["train"])
    assert a.ppl_floor == pytest.approx(math.exp(a.entropy_rate))
    assert a.oracle_ppl("valid") == pytest.approx(a.ppl_floor, rel=0.1)
    assert f"{a.ppl_floor:.3f}" in a.describe()
    assert len(set(a.vocab.words)) == 25 and a.vocab.words[0] == "<eos>"


class Bigram(pl.LightningModule):
    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.logits = nn.Embedding(vocab_size, vocab_size)
        self.seen: list[tuple[str, int]] = []

    def step(self, batch, batch_idx, stage):
        x, y = batch
        self.seen.append((stage, batch_idx))
        return nn.functional.cross_entropy(self.logits(x).flatten(0, 1), y.flatten())

    def training_step(self, batch, batch_idx):
        return self.step(batch, batch_idx, "train")

    def validation_step(self, batch, batch_idx):
        self.step(batch, batch_idx, "val")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_synthetic_datamodule_feeds_a_lightning_trainer(tmp_path):
    dm = SyntheticLMDataModule(batch_size=4, eval_batch_size=2, tgt_len=16, train_tokens=2000)
    model = Bigram(dm.vocab_size)
    trainer = pl.Trainer(
        max_epochs=1,
        limit_val_batches=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, dm)
    train = [i for stage, i in model.seen if stage == "train"]
    assert train == list(range(len(dm.segments("train")))) == list(range(32))
    assert [i for stage, i in model.seen if stage == "val"] == [0, 1, 2]
