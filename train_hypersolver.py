"""Train a learned HyperAnderson solver for a trained run (its DEQ stays frozen).

python train_hypersolver.py run_dir=logs/train/runs/2026-11-29_10-00-00
python train_hypersolver.py ckpt_path=<run>/checkpoints/last.ckpt hyper.steps=500
"""

import hydra
from omegaconf import DictConfig

from deq_lightning.app.hypersolver import register_schema, train_for_run
from deq_lightning.config import register_schemas

register_schemas()
register_schema()


@hydra.main(version_base="1.3", config_path="conf", config_name="train_hypersolver")
def main(cfg: DictConfig) -> None:
    train_for_run(cfg)


if __name__ == "__main__":
    main()
