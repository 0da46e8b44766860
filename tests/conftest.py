import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def run_env() -> dict[str, str]:
    """Environment for entry points run as subprocesses: offline W&B, one thread, full errors."""
    env = dict(os.environ)
    env.update(
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        OMP_NUM_THREADS="1",
        HYDRA_FULL_ERROR="1",
        PYTHONUNBUFFERED="1",
    )
    return env
