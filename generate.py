"""Sample text from a trained language model, carrying the DEQ memory token by token.

python generate.py run_dir=logs/train/runs/<lm run> prompt="the cat" n_tokens=40
"""

import hydra
from omegaconf import DictConfig

from deq_lightning.app.generate import generate_text
from deq_lightning.config import register_schemas

register_schemas()


@hydra.main(version_base="1.3", config_path="conf", config_name="generate")
def main(cfg: DictConfig) -> None:
    generate_text(cfg)


if __name__ == "__main__":
    main()
