"""The flow task: benchmark metrics through Lightning (hand-computed), summation across ranks,
stage-to-stage weight loading, frozen batch norm, the one-cycle schedule and the image panels."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from deq_lightning.callbacks.flow import flow_pair_to_images
from deq_lightning.metrics import FlowMetric
from deq_lightning.models.contract import ModelOutput
from deq_lightning.tasks.base import build_scheduler
from deq_lightning.tasks.flow import FlowTask

DEQ = {"_target_": "deq_lightning.models.deq_flow.DEQFlow", "size": "tiny", "corr_levels": 3}
SOLVER = {"name": "fixed_point", "max_iter": 2, "tol": 1e-3, "stop_mode": "rel"}
BACKWARD = {"name": "phantom", "steps": 1, "tau": 0.8}


def make_task(**kwargs: object) -> FlowTask:
    model = {**DEQ, **kwargs.pop("model", {})}
    return FlowTask(model=model, solver=SOLVER, backward=BACKWARD, **kwargs)


# ----------------------------------------------------------------------------------------------
# Metrics through the task: a model whose prediction is written in image1's first two channels
# ----------------------------------------------------------------------------------------------


def pair(pred: np.ndarray, gt: np.ndarray, valid: np.ndarray) -> dict:
    """A 4x4 sample; the fake model predicts ``pred`` (carried in image1)."""
    image1 = torch.zeros(3, 4, 4)
    image1[:2] = torch.from_numpy(pred).float()
    return {
        "image1": image1,
        "image2": torch.zeros(3, 4, 4),
        "flow": torch.from_numpy(gt).float(),
        "valid": torch.from_numpy(valid).float(),
    }


def constant(u: float, v: float) -> np.ndarray:
    return np.stack([np.full((4, 4), u, np.float64), np.full((4, 4), v, np.float64)])


def dense_set() -> list[dict]:
    # gt (1, 0); errors (3, 4) on the top half (EPE 5), (0, 0.5) on the bottom half (EPE 0.5).
    gt = constant(1, 0)
    pred = gt.copy()
    pred[:, :2] += np.array([3.0, 4.0])[:, None, None]
    pred[1, 2:] += 0.5
    return [pair(pred, gt, np.ones((4, 4)))]


def sparse_set() -> list[dict]:
    # Image A: gt (10, 0), 4 valid pixels with EPE 5 (outliers: > 3 px and > 5% of 10).
    # Image B: gt (2, 0), 12 valid pixels with EPE 0. Invalid pixels carry EPE 100.
    gt_a, gt_b = constant(10, 0), constant(2, 0)
    valid_a = np.zeros((4, 4))
    valid_a[0] = 1
    valid_b = 1 - valid_a
    pred_a = gt_a + np.where(valid_a > 0, 0, 100)[None] * np.array([1.0, 0.0])[:, None, None]
    pred_a[:, 0] += np.array([3.0, 4.0])[:, None]
    pred_b = gt_b + np.where(valid_b > 0, 0, 100)[None] * np.array([1.0, 0.0])[:, None, None]
    return [pair(pred_a, gt_a, valid_a), pair(pred_b, gt_b, valid_b)]


class PredictionInImage(FlowTask):
    def run_model(self, image1, image2, **kwargs):
        flow = image1[:, :2]
        return ModelOutput({"flow": flow, "flow_preds": [flow]})


def test_benchmark_metrics_by_hand(tmp_path):
    task = PredictionInImage(model=DEQ, solver=SOLVER, backward=BACKWARD)
    task.flow_metrics = task.make_metrics(["sintel_clean", "kitti"])
    trainer = pl.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path
    )
    loaders = [DataLoader(dense_set(), batch_size=1), DataLoader(sparse_set(), batch_size=1)]
    (dense, sparse) = trainer.test(task, dataloaders=loaders, verbose=False)
    m = {**dense, **sparse}
    # Dense: pooled over all pixels.
    assert m["test/sintel_clean/epe"] == pytest.approx(2.75)
    assert m["test/sintel_clean/1px"] == pytest.approx(50.0)
    assert m["test/sintel_clean/5px"] == pytest.approx(50.0)  # EPE 5 is not below 5
    assert m["test/sintel_clean/epe_zero"] == pytest.approx(1.0)
    assert "test/sintel_clean/f1_all" not in m
    # Sparse: per-image EPE over valid pixels, then the mean over images (pooled would be 1.25).
    assert m["test/kitti/epe"] == pytest.approx(2.5)
    assert m["test/kitti/f1_all"] == pytest.approx(25.0)
    assert m["test/kitti/1px"] == pytest.approx(75.0)
    assert m["test/kitti/epe_zero"] == pytest.approx((10 + 2) / 2)
    # The headline keys are the first set's.
    assert m["test/epe"] == pytest.approx(2.75) and m["test/epe_zero"] == pytest.approx(1.0)


def test_metrics_summed_over_two_ranks_equal_one_rank():
    samples = dense_set() + sparse_set()
    one, ranks = FlowMetric(), [FlowMetric(), FlowMetric()]
    for i, s in enumerate(samples):
        args = (s["image1"][None, :2], s["flow"][None], s["valid"][None])
        one.update(*args)
        ranks[i % 2].update(*args)
    ranks[0].merge_state(ranks[1])  # what dist_reduce_fx="sum" does across ranks
    a, b = one.compute(), ranks[0].compute()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------------------------
# Training options
# ----------------------------------------------------------------------------------------------


def test_init_from_loads_the_previous_stage(tmp_path):
    source = make_task()
    run_dir = tmp_path / "chairs_run"
    (run_dir / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": source.state_dict()}, run_dir / "checkpoints" / "last.ckpt")
    task = make_task(init_from=str(run_dir))
    task._trainer = SimpleNamespace(ckpt_path=None, datamodule=None)
    task.setup("fit")
    for (name, a), b in zip(source.model.state_dict().items(), task.model.state_dict().values()):
        assert torch.equal(a, b), name
    # a resume keeps the checkpoint's weights instead
    resumed = make_task(init_from=str(tmp_path / "nowhere"))
    resumed._trainer = SimpleNamespace(ckpt_path="last.ckpt", datamodule=None)
    resumed.setup("fit")


def test_init_from_errors_are_actionable(tmp_path):
    task = make_task(init_from=str(tmp_path / "nowhere"), require_init=True)
    task._trainer = SimpleNamespace(ckpt_path=None, datamodule=None)
    with pytest.raises(FileNotFoundError, match=r"task.init_from=.*checkpoints/last\.ckpt"):
        task.setup("fit")
    required = make_task(require_init=True)
    required._trainer = SimpleNamespace(ckpt_path=None, datamodule=None)
    with pytest.raises(ValueError, match=r"set task\.init_from"):
        required.setup("fit")
    other = make_task(model={"hidden_dim": 16})
    torch.save({"state_dict": other.state_dict()}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="same model"):
        make_task().load_stage_weights(tmp_path / "other.ckpt")


def test_freeze_bn_keeps_statistics_through_training_mode():
    def bn_training(task: FlowTask) -> list[bool]:
        return [m.training for m in task.modules() if isinstance(m, torch.nn.BatchNorm2d)]

    frozen = bn_training(make_task(freeze_bn=True).train())
    assert frozen and not any(frozen)
    assert all(bn_training(make_task().train()))


def test_one_cycle_schedule():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=4e-4)
    sched = build_scheduler({"name": "onecycle", "warmup": 0.1}, opt, 100)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    peak = int(np.argmax(lrs))
    assert lrs[0] < 4e-5 and max(lrs) == pytest.approx(4e-4, rel=0.02) and 8 <= peak <= 11
    assert lrs[-1] < 1e-5
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1 :]))  # linear anneal, no restart
    with pytest.raises(ValueError, match="pct_start"):
        build_scheduler({"name": "onecycle", "warmup": 5}, opt, 100)


def test_flow_images_share_one_colour_scale_and_black_out_missing_truth():
    flow = torch.randn(2, 8, 6) * 3
    valid = torch.ones(8, 6)
    valid[:2] = 0
    image = flow_pair_to_images(flow, flow, valid)
    assert image.shape == (8, 12, 3) and image.dtype == np.uint8
    assert (image[2:, :6] == image[2:, 6:]).all()  # same flow, same colours
    assert (image[:2, 6:] == 0).all() and (image[:2, :6] != 0).any()


def test_benchmark_prediction_warm_starts_within_sequences_only():
    task = make_task().eval()
    task._trainer = SimpleNamespace(testing=False, world_size=1)
    seen = []
    run_model = task.run_model

    def spy(image1, image2, flow_init=None, **kwargs):
        seen.append(flow_init is not None)
        return run_model(image1, image2, flow_init=flow_init, **kwargs)

    task.run_model = spy
    frames = torch.rand(4, 1, 3, 64, 72) * 255
    for i, new_sequence in enumerate([True, False, True, False]):
        batch = {"image1": frames[i], "image2": frames[i], "name": [f"f{i}.flo"]}
        out = task.predict_step({**batch, "new_sequence": torch.tensor([new_sequence])}, i)
        assert out["names"] == [f"f{i}.flo"] and out["flow"].shape == (1, 2, 64, 72)
    assert seen == [False, True, False, True]


def test_train_seed_makes_the_training_pairs_independent_of_the_model():
    """The embedded set draws training pairs from torch's global generator; ``train_seed``
    reseeds it when training starts, so two models that consume different amounts of randomness
    at initialisation see the same pairs (and the logged checksum agrees)."""
    from deq_lightning.datamodules.flow import SyntheticFlowDataModule

    sums = []
    for consumed in (0, 1000):
        torch.manual_seed(0)
        torch.rand(consumed)  # a model initialisation of another size
        task = make_task(train_seed=7)
        dm = SyntheticFlowDataModule(batch_size=2, train_size=8, val_size=2, test_size=2)
        trainer = pl.Trainer(
            max_steps=2, limit_val_batches=0, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False,
        )  # fmt: skip
        trainer.fit(task, datamodule=dm)
        sums.append(task._data_checksum)
    assert sums[0] > 0 and sums[0] == sums[1]


def test_predict_flow_summary_says_what_the_solver_did():
    from deq_lightning.app.predict_flow import PairResult, solver_summary

    def result(warm: bool, steps: float, best: float, converged: bool) -> PairResult:
        return PairResult("p", "p.flo", "p.png", warm, steps, 0.02, best, converged, 24)

    line = solver_summary([result(False, 24.0, 9.0, False), result(True, 10.0, 10.0, True)])
    assert "17.0 steps run of 24" in line and "from step 9.5" in line
    assert "1/2 pairs converged" in line and "1/2 pairs warm-started" in line
    assert solver_summary([PairResult("p", "f", "c", False, None, None)]) == ""
