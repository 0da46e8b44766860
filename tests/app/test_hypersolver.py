"""train_hypersolver.py on a trained run, then eval.py with solver=hyperanderson; its configs."""

import json

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from deq_lightning.app.checks import check_config
from deq_lightning.app.hypersolver import register_schema, train_for_run
from deq_lightning.app.train import train

from ..helpers.app import FAST, compose_cfg, run_script


def test_hyperanderson_config_composes_and_checks_its_path(tmp_path):
    cfg = compose_cfg(["solver=hyperanderson"], tmp_path / "run")
    assert cfg.solver.path is None and cfg.solver.m == 9
    with pytest.raises(ValueError, match="path must be the weights file"):
        check_config(cfg)  # before any data is read
    with pytest.raises(ConfigCompositionException, match="pth"):
        compose_cfg(["solver=hyperanderson", "solver.pth=x.pt"], tmp_path / "run")


def test_train_hypersolver_config_rejects_typos(tmp_path):
    register_schema()
    cfg = compose_cfg([], tmp_path / "run", config_name="train_hypersolver")
    assert cfg.hyper.steps == 300 and cfg.hyper.unroll is None
    with pytest.raises(ConfigCompositionException, match="stepz"):
        register_schema()
        compose_cfg(["hyper.stepz=3"], tmp_path / "run", config_name="train_hypersolver")


@pytest.mark.slow
def test_train_hypersolver_then_eval_with_it(tmp_path, run_env, capsys):
    run_dir = tmp_path / "run"
    limits = ["trainer.max_epochs=1", "trainer.limit_train_batches=8", "task.pretrain_steps=2"]
    limits += ["trainer.limit_val_batches=2", "trainer.limit_test_batches=2"]
    cfg = compose_cfg([*FAST, *limits], run_dir)
    trained = train(cfg)
    # What the Hydra app writes to <run>/.hydra/config.yaml (in-process runs do not).
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    saved = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    OmegaConf.save(saved, run_dir / ".hydra" / "config.yaml")

    register_schema()
    args = [f"run_dir={run_dir}", "hyper.steps=6", "hyper.batches=3", "hyper.holdout=1"]
    hcfg = compose_cfg([*args, "hyper.ref_max_iter=30"], tmp_path / "h", "train_hypersolver")
    weights = train_for_run(hcfg)
    assert weights == run_dir / "hyperanderson.pt"
    blob = torch.load(weights, weights_only=True)
    assert blob["config"]["dim"] == 16 * 8 * 8 + 16 * 4 * 4  # the digits MDEQ's two streams
    budget = cfg.solver.eval_opts.max_iter  # the run's evaluation budget (cls_digits: 30)
    assert blob["meta"]["unroll"] == budget
    usage = f"python eval.py run_dir={run_dir} solver=hyperanderson solver.path={weights}"
    assert usage in capsys.readouterr().out

    solver = ["solver=hyperanderson", f"solver.path={weights}", f"solver.max_iter={budget}"]
    run_script("eval.py", [f"run_dir={run_dir}", *solver], run_env, tmp_path)
    (eval_run,) = (tmp_path / "logs" / "eval" / "runs").iterdir()
    metrics = json.loads((eval_run / "metrics.json").read_text())
    # Barely trained, so only: the same accuracy as Anderson at the same budget, within noise.
    assert abs(metrics["test/acc"] - trained["test/acc"]) <= 0.1, (metrics, trained)
    assert metrics["test/fwd_nstep"] <= budget


@pytest.mark.parametrize(
    "overrides",
    [
        ["experiment=lm_tiny"],
        ["experiment=lm_trellis_tiny", "data.train_tokens=20000", "data.valid_tokens=4000"],
    ],
    ids=["deq_transformer", "deq_trellisnet"],
)
def test_lm_problems_collected_by_the_trainer_can_be_trained_on(overrides, tmp_path):
    """The LMs' f close over masks, memory or history made in the evaluation step; they must be
    usable in the solver's training graph (not inference-mode tensors)."""
    import hydra

    from deq_lightning.app.hypersolver import HyperTrainOptions, collect_problems, fit
    from deq_lightning.deq.hyper import HyperAndersonNet

    cfg = compose_cfg(overrides, tmp_path / "run")
    dm = hydra.utils.instantiate(cfg.data, _convert_="all")
    dm.prepare_data()
    dm.setup("fit")
    task = hydra.utils.instantiate(cfg.task, _recursive_=False)
    task.build_for(dm)
    task.eval().requires_grad_(False)
    opts = HyperTrainOptions(steps=3, batches=2, holdout=0, ref_max_iter=15, init="pointwise")
    problems = collect_problems(task, dm, opts)
    assert len(problems) == 2 and not problems[0].x0.is_inference()
    net = HyperAndersonNet(problems[0].x0.shape[1], m=opts.m, pool=opts.pool, hidden=opts.hidden)
    losses = fit(net, problems, opts, 4, log=lambda _: None)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
