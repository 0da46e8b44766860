"""The copy-memory task (thesis ch. 3, DEQ paper §5: DEQ-TrellisNet reaches a loss of 3.5e-6 at
T = 400), generated on the fly.

A sample is a short random sequence of ``copy_len`` symbols, ``T`` blanks, a recall cue and
``copy_len - 1`` more blanks; from the cue on, the model must emit the symbols it saw ``T + 1``
positions earlier, in order. The input and target of one sample, for symbols ``s_1 .. s_K``:

    input    s_1 .. s_K   _ .. _ (T)   cue   _ .. _ (K-1)
    target   -   .. -     - .. -       s_1   s_2 .. s_K        (- : ignored, IGNORE)

Token ids: 0 is the blank, ``1 .. n_symbols`` the symbols, ``n_symbols + 1`` the cue, so the
vocabulary has ``n_symbols + 2`` words and guessing gets ``1 / n_symbols`` of the recalled symbols
right. The loss and ``recall_acc`` count the recalled positions only. Nothing is stored: sample
``i`` of a split is drawn from a generator seeded by ``(seed, split, i)``, so every run (and
every DDP rank) sees the same samples and the training split can be as large as wanted.
"""

from __future__ import annotations

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from deq_lightning.datamodules.common import eval_loader, per_device_batch_size

IGNORE = -100  # target of the positions that are not recalled (F.cross_entropy's ignore_index)
BLANK = 0
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


class CopyMemoryDataset(Dataset):
    """``n`` samples ``(input (L,), target (L,))`` with ``L = 2 * copy_len + T``, made on access."""

    def __init__(
        self, n: int, blank_len: int, copy_len: int, n_symbols: int, seed: int, split: str
    ) -> None:
        self.n, self.blank_len, self.copy_len, self.n_symbols = n, blank_len, copy_len, n_symbols
        self.seed, self.split_id = seed, SPLIT_IDS[split]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        if not 0 <= i < self.n:
            raise IndexError(f"sample {i} of a split with {self.n}")
        rng = np.random.default_rng([self.seed, self.split_id, i])
        K, T = self.copy_len, self.blank_len
        symbols = torch.from_numpy(rng.integers(1, self.n_symbols + 1, K))
        x = torch.full((2 * K + T,), BLANK, dtype=torch.long)
        x[:K] = symbols
        x[K + T] = self.n_symbols + 1  # the recall cue
        y = torch.full_like(x, IGNORE)
        y[K + T :] = symbols
        return x, y


class CopyMemoryDataModule(pl.LightningDataModule):
    """Copy-memory batches ``(inputs (B, L), targets (B, L))``; ``targets`` is :data:`IGNORE`
    except at the ``copy_len`` recalled positions. ``blank_len`` is the thesis's T."""

    def __init__(
        self,
        blank_len: int = 400,
        copy_len: int = 10,
        n_symbols: int = 8,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        n_train: int = 100_000,
        n_val: int = 1000,
        n_test: int = 1000,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for name, value, low in (
            ("blank_len", blank_len, 0),
            ("copy_len", copy_len, 1),
            ("n_symbols", n_symbols, 2),
            ("n_train", n_train, 1),
            ("n_val", n_val, 1),
            ("n_test", n_test, 1),
        ):
            if value < low:
                raise ValueError(f"data.{name} must be >= {low}, got {value}")
        self.blank_len, self.copy_len, self.n_symbols = blank_len, copy_len, n_symbols
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.sizes = {"train": n_train, "val": n_val, "test": n_test}
        self.num_workers, self.seed = num_workers, seed

    @property
    def vocab_size(self) -> int:
        """Blank, the symbols and the cue."""
        return self.n_symbols + 2

    @property
    def seq_len(self) -> int:
        return 2 * self.copy_len + self.blank_len

    @property
    def chance_recall_acc(self) -> float:
        return 1.0 / self.n_symbols

    def dataset(self, split: str) -> CopyMemoryDataset:
        return CopyMemoryDataset(
            self.sizes[split], self.blank_len, self.copy_len, self.n_symbols, self.seed, split
        )

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.dataset("train"),
            batch_size=per_device_batch_size(self.batch_size, self.trainer),
            shuffle=True,
            num_workers=self.num_workers,
            drop_last=True,
        )

    def _eval(self, split: str) -> DataLoader:
        batch = per_device_batch_size(self.eval_batch_size, self.trainer)
        return eval_loader(self.dataset(split), batch, self.num_workers, self.trainer)

    def val_dataloader(self) -> DataLoader:
        return self._eval("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval("test")
