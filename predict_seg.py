"""Segment your own images with a trained segmentation run: colour PNGs and id PNGs.

python predict_seg.py run_dir=logs/train/runs/<run> input_dir=<folder of images>
python predict_seg.py ckpt_path=<ckpt> input_dir=data/cityscapes/leftImg8bit/test \
    output_dir=cityscapes_test task.test_flip=true trainer.devices=1
  -> <output_dir>/color/<city>/<frame>.png and labelIds/<city>/<frame>.png (benchmark server)
"""

import hydra
from omegaconf import DictConfig

from deq_lightning.app.predict_seg import predict_segmentation
from deq_lightning.config import register_schemas

register_schemas()


@hydra.main(version_base="1.3", config_path="conf", config_name="predict_seg")
def main(cfg: DictConfig) -> None:
    predict_segmentation(cfg)


if __name__ == "__main__":
    main()
