import pytest
import torch

from deq_lightning.datamodules.copy_memory import IGNORE, CopyMemoryDataModule


def test_a_sample_is_symbols_blanks_cue_and_the_recall():
    dm = CopyMemoryDataModule(blank_len=7, copy_len=4, n_symbols=5, n_train=10)
    x, y = dm.dataset("train")[3]
    K, T = 4, 7
    assert x.shape == y.shape == (2 * K + T,) == (dm.seq_len,)
    symbols = x[:K]
    assert ((symbols >= 1) & (symbols <= 5)).all()
    assert (x[K : K + T] == 0).all() and (x[K + T + 1 :] == 0).all()
    assert x[K + T] == dm.vocab_size - 1 == 6  # the cue: the last word
    assert (y[: K + T] == IGNORE).all()
    assert torch.equal(y[K + T :], symbols)  # recalled in order, from the cue on
    assert dm.chance_recall_acc == pytest.approx(1 / 5)


def test_samples_are_reproducible_and_differ_by_index_split_and_seed():
    dm = CopyMemoryDataModule(blank_len=3, n_train=50, n_val=50)
    a = dm.dataset("train")
    assert torch.equal(a[5][0], dm.dataset("train")[5][0])
    firsts = {tuple(a[i][0][:10].tolist()) for i in range(50)}
    assert len(firsts) == 50
    assert not torch.equal(a[5][0], dm.dataset("val")[5][0])
    other = CopyMemoryDataModule(blank_len=3, n_train=50, seed=1).dataset("train")
    assert not torch.equal(a[5][0], other[5][0])
    # Symbols are uniform over 1..n_symbols (so chance is 1 / n_symbols).
    counts = torch.bincount(torch.cat([a[i][0][:10] for i in range(50)]), minlength=9)
    assert counts[0] == 0 and counts[1:].min() > 0.6 * counts[1:].float().mean()
    with pytest.raises(IndexError):
        a[50]


def test_loaders_give_batches_of_inputs_and_targets():
    dm = CopyMemoryDataModule(blank_len=5, batch_size=8, eval_batch_size=4, n_train=20, n_val=6)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == (8, 25) and x.dtype == torch.long
    assert len(dm.train_dataloader()) == 2  # drop_last: only full training batches
    val = list(dm.val_dataloader())
    assert [b[0].shape[0] for b in val] == [4, 2]  # every validation sample once


@pytest.mark.parametrize(
    "kw, key",
    [
        ({"copy_len": 0}, "copy_len"),
        ({"n_symbols": 1}, "n_symbols"),
        ({"blank_len": -1}, "blank_len"),
    ],
)
def test_bad_settings_name_the_key(kw, key):
    with pytest.raises(ValueError, match=f"data.{key}"):
        CopyMemoryDataModule(**kw)
