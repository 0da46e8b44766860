"""The model contract: every configured family (DEQ, layered twin, baseline) built from its
``conf/model`` file returns a ``ModelOutput`` whose stats are ``DEQStats`` for a DEQ and ``None``
otherwise, and still unpacks as ``(output, stats)``."""

from __future__ import annotations

from pathlib import Path

import hydra.utils
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from deq_lightning.deq import DEQStats
from deq_lightning.models.contract import Model, ModelOutput

CONF = Path(__file__).resolve().parents[2] / "conf"
FAST_DEQ = {"solver": "fixed_point", "solver_opts": {"max_iter": 2}, "backward": "phantom"}
VOCAB = 30


def images(channels: int, size: int) -> tuple[torch.Tensor]:
    return (torch.rand(2, channels, size, size),)


def tokens() -> tuple[torch.Tensor, torch.Tensor, None]:
    ids = torch.randint(0, VOCAB, (2, 5))
    return ids, ids, None


def frames() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.rand(1, 3, 64, 64) * 255, torch.rand(1, 3, 64, 64) * 255


# (conf/model name, is a DEQ, inputs)
CASES = [
    ("mdeq_digits", True, lambda: images(1, 8)),
    ("mdeq_digits_layered", False, lambda: images(1, 8)),
    ("mdeq_seg_tiny", True, lambda: images(3, 8)),
    ("mdeq_seg_tiny_layered", False, lambda: images(3, 8)),
    ("deq_transformer_tiny", True, tokens),
    ("deq_transformer_tiny_layered", False, tokens),
    ("deq_trellisnet_tiny", True, tokens),
    ("deq_trellisnet_tiny_layered", False, tokens),
    ("deq_flow_tiny", True, frames),
    ("raft_tiny", False, frames),
    ("resnet18", False, lambda: images(3, 16)),
]


def model_configs(*names: str) -> list[dict]:
    """The composed ``conf/model/<name>.yaml`` nodes, as plain dicts."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return [OmegaConf.to_container(compose(f"model/{n}").model, resolve=True) for n in names]


@pytest.mark.parametrize("name, is_deq, inputs", CASES, ids=[c[0] for c in CASES])
def test_every_model_returns_model_output(name: str, is_deq: bool, inputs) -> None:
    (cfg,) = model_configs(name)
    if "vocab_size" in cfg:
        cfg["vocab_size"] = VOCAB
    if name == "raft_tiny":
        cfg.update(num_iters=1, eval_iters=1)
    if is_deq:
        cfg["deq"] = FAST_DEQ
    torch.manual_seed(0)
    model = hydra.utils.instantiate(cfg, _convert_="all").eval()
    assert isinstance(model, Model)
    with torch.no_grad():
        out = model(*inputs())
    assert isinstance(out, ModelOutput)
    if is_deq:
        assert isinstance(out.stats, DEQStats)
    else:
        assert out.stats is None
    output, stats = out  # a NamedTuple: tasks keep unpacking it
    assert output is out.output and stats is out.stats


def test_every_configured_model_class_is_covered() -> None:
    """A new family (a new ``_target_`` in conf/model) must join CASES above."""
    configured = {
        c["_target_"] for c in model_configs(*(p.stem for p in CONF.glob("model/*.yaml")))
    }
    covered = {c["_target_"] for c in model_configs(*(name for name, _, _ in CASES))}
    assert configured == covered, f"add a tiny config of {sorted(configured - covered)} to CASES"
