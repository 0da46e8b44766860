"""Train a DEQ task.

python train.py                                   # the embedded default (MDEQ on digits)
python train.py experiment=cifar10_mdeq_large trainer=gpu
python train.py -m solver=anderson,broyden seed=0,1  # a sweep, one W&B run per job
"""

import hydra
from omegaconf import DictConfig

from deq_lightning.app.results import metric_value
from deq_lightning.app.train import train
from deq_lightning.config import register_schemas

register_schemas()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    return metric_value(metrics, cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
