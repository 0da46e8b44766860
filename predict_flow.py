"""Optical flow for your own frames with a trained flow run: .flo files and colour PNGs.

python predict_flow.py run_dir=logs/train/runs/<run> input=[frame1.png,frame2.png]
python predict_flow.py run_dir=<run> input=<folder of frames>          (sorted by name)
python predict_flow.py ckpt_path=<ckpt> input=clip.mp4 solver.eval_opts.max_iter=60
  -> <output_dir>/flo/<frame>.flo, color/<frame>.png and summary.json (solver steps per pair);
     warm start along the sequence (warm_start=false to solve every pair from zero)
"""

import hydra
from omegaconf import DictConfig

from deq_lightning.app.predict_flow import predict_flow
from deq_lightning.config import register_schemas

register_schemas()


@hydra.main(version_base="1.3", config_path="conf", config_name="predict_flow")
def main(cfg: DictConfig) -> None:
    predict_flow(cfg)


if __name__ == "__main__":
    main()
