"""Evaluate a trained run with its own saved config (overrides allowed).

python eval.py run_dir=logs/train/runs/2026-11-29_10-00-00
python eval.py ckpt_path=<run>/checkpoints/last.ckpt solver.eval_opts.max_iter=60
"""

import hydra
from omegaconf import DictConfig

from deq_lightning.app.evaluate import evaluate
from deq_lightning.config import register_schemas

register_schemas()


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
