"""Composition of every config, and the errors a user gets for bad input (no training here)."""

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from deq_lightning.app.checks import check_config
from deq_lightning.config import build_model, deq_kwargs, drop_unused_keys, plain

from ..helpers.app import EXPERIMENTS, compose_cfg


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_resolves(experiment, tmp_path):
    cfg = compose_cfg([f"experiment={experiment}"], tmp_path / "run")
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["task"]["model"] == resolved["model"]
    check_config(cfg)


@pytest.mark.parametrize(
    "group",
    [
        "solver=fixed_point",
        "solver=broyden",
        "backward=phantom",
        "backward=one_step",
        "backward=unrolled",
        "logger=many",
        "logger=tensorboard",
        "strategy=ddp",
        "strategy=ddp_spawn",
        "strategy=ddp_fork",
        "strategy=fsdp",
        "strategy=deepspeed",
        "trainer=gpu",
        "debug=fdr",
        "debug=overfit",
        "debug=limit",
        "debug=profiler",
        "hydra/launcher=slurm",
        "hydra/launcher=local",
    ],
)
def test_group_options_compose(group, tmp_path):
    cfg = compose_cfg([group], tmp_path / "run")
    OmegaConf.to_container(cfg.task, resolve=True)


def test_default_is_the_digits_experiment(tmp_path):
    default = compose_cfg([], tmp_path / "a")
    explicit = compose_cfg(["experiment=cls_digits"], tmp_path / "a")
    assert OmegaConf.to_container(default.task, resolve=True) == OmegaConf.to_container(
        explicit.task, resolve=True
    )
    assert default.data._target_.endswith("DigitsDataModule")


def test_solver_and_backward_reach_the_deq(tmp_path):
    cfg = compose_cfg(
        [
            "solver=broyden",
            "solver.max_iter=7",
            "solver.eval_opts.max_iter=11",
            "solver.memory=4",
            "backward=phantom",
            "backward.steps=3",
            # cls_digits sets implicit's budget; a switch of mode drops it explicitly
            "backward.extra_ok=true",
        ],
        tmp_path / "run",
    )
    kw = deq_kwargs(plain(cfg.task.solver), plain(cfg.task.backward))
    assert kw["solver"] == "broyden" and kw["solver_opts"]["max_iter"] == 7
    assert kw["solver_opts"]["memory"] == 4 and "m" not in kw["solver_opts"]
    assert kw["eval_solver_opts"] == {"max_iter": 11}
    assert kw["backward"] == "phantom" and kw["backward_opts"] == {"steps": 3, "tau": 0.8}


def test_an_evaluation_solver_reaches_the_deq(tmp_path):
    """``solver.eval_opts.solver``: another solver at evaluation, taking its own options there."""
    cfg = compose_cfg(
        [
            "solver=fixed_point",
            "solver.max_iter=7",
            "solver.eval_opts.solver=anderson",
            "solver.eval_opts.m=3",
            "solver.eval_opts.max_iter=11",
        ],
        tmp_path / "run",
    )
    kw = deq_kwargs(plain(cfg.task.solver), plain(cfg.task.backward))
    assert (kw["solver"], kw["eval_solver"]) == ("fixed_point", "anderson")
    assert kw["eval_solver_opts"] == {"max_iter": 11, "m": 3}
    check_config(cfg)
    for bad, match in [
        (
            "solver.eval_opts.memory=4",
            r"solver\.eval_opts\.memory=4 is not an option of "
            r"solver\.eval_opts\.solver=anderson",
        ),
        ("solver.eval_opts.solver=newton", r"solver\.eval_opts\.solver: unknown solver 'newton'"),
    ]:
        cfg = compose_cfg(
            ["solver=fixed_point", "solver.eval_opts.solver=anderson", bad], tmp_path / "run"
        )
        with pytest.raises(ValueError, match=match):
            deq_kwargs(plain(cfg.task.solver), plain(cfg.task.backward))


@pytest.mark.parametrize(
    "overrides, match",
    [
        (
            ["solver=broyden", "solver.m=3"],
            r"solver\.m=3 is not an option of solver=broyden \(its options: max_iter, tol, "
            r"stop_mode, diverge_factor, compact, memory\); remove it, or set "
            r"solver\.extra_ok=true",
        ),
        (["solver=broyden", "solver.eval_opts.lam=0.1"], r"solver\.eval_opts\.lam=0\.1 is not"),
        (
            ["backward=phantom", "backward.max_iter=9"],
            r"backward\.max_iter=9, backward\.tol=0\.001 are not options of backward=phantom "
            r"\(its options: steps, tau\); remove them, or set backward\.extra_ok=true",
        ),
        (
            ["backward.solver=broyden", "+backward.solver_opts.m=3"],
            r"backward\.solver_opts\.m=3 is not an option of backward\.solver=broyden \(its "
            r"options: max_iter, tol, stop_mode, diverge_factor, compact, memory\)",
        ),
    ],
)
def test_a_key_the_chosen_solver_does_not_take_fails(overrides, match, tmp_path):
    cfg = compose_cfg(overrides, tmp_path / "run")
    with pytest.raises(ValueError, match=match):
        deq_kwargs(plain(cfg.task.solver), plain(cfg.task.backward))
    with pytest.raises(ValueError, match="invalid solver/backward config"):
        check_config(cfg)


def test_a_mode_switch_drops_only_the_keys_the_config_files_set(tmp_path):
    """The README's ``backward=phantom`` on the default (written for the implicit backward):
    the default's implicit budget is dropped with a note; a key the user typed still fails."""
    readme = ["solver=broyden", "solver.max_iter=18", "backward=phantom", "backward.steps=5"]
    cfg = compose_cfg(readme, tmp_path / "run")
    check_config(cfg)
    assert cfg.backward.max_iter is None and cfg.backward.tol is None
    kw = deq_kwargs(plain(cfg.task.solver), plain(cfg.task.backward))
    assert kw["backward_opts"] == {"steps": 5, "tau": 0.8} and kw["solver_opts"]["max_iter"] == 18
    cfg = compose_cfg([*readme, "backward.max_iter=9"], tmp_path / "run")
    assert drop_unused_keys(cfg, {"backward", "backward.max_iter"}) == ["backward.tol"]
    with pytest.raises(ValueError, match=r"backward\.max_iter=9 is not an option of backward"):
        check_config(cfg)


def test_extra_ok_ignores_keys_of_other_solvers(tmp_path):
    extra = ["solver.extra_ok=true", "backward.extra_ok=true"]
    overrides = ["solver=broyden", "solver.m=3", "backward.solver=broyden"]
    cfg = compose_cfg([*overrides, "+backward.solver_opts.m=3", *extra], tmp_path / "run")
    kw = deq_kwargs(plain(cfg.task.solver), plain(cfg.task.backward))
    assert "m" not in kw["solver_opts"] and "m" not in kw["backward_opts"]
    check_config(cfg)
    # The inner solver's own options do reach it.
    cfg = compose_cfg([*overrides[2:], "+backward.solver_opts.memory=3"], tmp_path / "run")
    assert deq_kwargs(plain(cfg.task.solver), plain(cfg.task.backward))["backward_opts"] == {
        "solver": "broyden", "max_iter": 20, "tol": 1e-3, "stop_mode": "rel", "memory": 3
    }  # fmt: skip


def test_a_node_saved_before_extra_ok_keeps_its_old_meaning():
    """Runs saved by the earlier schema hold every solver's defaults and no ``extra_ok``."""
    solver = {"name": "fixed_point", "max_iter": 12, "m": 9, "memory": None, "damping": 0.0}
    backward = {"name": "phantom", "solver": "anderson", "max_iter": 100, "steps": 1, "tau": 0.8}
    kw = deq_kwargs(solver, {**backward, "solver_opts": {}})
    assert kw["solver_opts"] == {"max_iter": 12, "damping": 0.0}
    assert kw["backward_opts"] == {"steps": 1, "tau": 0.8}


@pytest.mark.parametrize(
    "override, error, match",
    [
        ("solver.mm=3", ConfigCompositionException, "mm"),
        ("solver.max_iter=abc", ConfigCompositionException, "max_iter"),
        ("solver=broyden solver.memory=many", ConfigCompositionException, "memory"),
        ("solver=anderson solver.memory=2.5", ConfigCompositionException, "memory"),
        ("solver.extra_ok=maybe", ConfigCompositionException, "extra_ok"),
        ("backward=phantom backward.tau=x", ConfigCompositionException, "tau"),
        ("backward.stepz=2", ConfigCompositionException, "stepz"),
        ("trainer.max_epoch=3", ConfigCompositionException, "max_epoch"),
        ("trainer.max_epochs=many", ConfigCompositionException, "max_epochs"),
        ("solver=newton", ConfigCompositionException, "\tanderson\n\tbroyden\n\tfixed_point"),
        ("model=resnet_imaginary", ConfigCompositionException, "Available options"),
    ],
)
def test_typos_and_wrong_types_fail_at_composition(override, error, match, tmp_path):
    with pytest.raises(error) as info:
        compose_cfg(override.split(), tmp_path / "run")
    text = str(info.value) + str(info.value.__cause__ or "")
    assert match in text, text


def test_impossible_values_fail_early_with_the_key(tmp_path):
    cfg = compose_cfg(["solver.max_iter=-3"], tmp_path / "run")
    with pytest.raises(ValueError, match="max_iter must be an integer >= 1, got -3"):
        check_config(cfg)
    cfg = compose_cfg(["backward.tol=0"], tmp_path / "run")
    with pytest.raises(ValueError, match=r"backward\.tol must be a number > 0"):
        check_config(cfg)
    cfg = compose_cfg(["trainer.devices=2", "data.batch_size=63"], tmp_path / "run")
    with pytest.raises(
        ValueError, match=r"data\.batch_size=63 is not divisible by the world size 2"
    ):
        check_config(cfg)


def test_unknown_task_option_is_rejected(tmp_path):
    from hydra.utils import instantiate

    cfg = compose_cfg(["+task.pretrain_stepz=5"], tmp_path / "run")
    with pytest.raises(Exception, match="pretrain_stepz"):
        instantiate(cfg.task, _recursive_=False)


def test_structured_schema_types(tmp_path):
    cfg = compose_cfg(["solver.max_iter=12", "solver.tol=1e-5"], tmp_path / "run")
    assert isinstance(cfg.solver.max_iter, int) and cfg.solver.tol == 1e-5
    with pytest.raises((ValidationError, ConfigKeyError)):
        cfg.solver.max_iter = "x"


# Each layered twin config and the experiment whose DEQ it mirrors (vocab for LM models).
TWINS = [
    ("cls_digits", "mdeq_digits_layered", {}),
    ("seg_tiny", "mdeq_seg_tiny_layered", {}),
    ("lm_tiny", "deq_transformer_tiny_layered", {"vocab_size": 25}),
    ("lm_small", "deq_transformer_small_layered", {"vocab_size": 10000}),
    ("lm_trellis_tiny", "deq_trellisnet_tiny_layered", {"vocab_size": 25}),
    ("flow_tiny", "raft_tiny", {}),
]


@pytest.mark.parametrize("experiment, twin, extra", TWINS)
def test_layered_twins_compose_and_have_no_solver(experiment, twin, extra, tmp_path):
    def build(overrides):
        cfg = compose_cfg([f"experiment={experiment}", *overrides], tmp_path / "run")
        model = {**plain(cfg.task.model), **extra}
        return build_model(model, plain(cfg.task.solver), plain(cfg.task.backward))

    deq, layered = build([]), build([f"model={twin}"])
    assert any(type(m).__name__ == "DEQ" for m in deq.modules())
    assert not any(type(m).__name__ == "DEQ" for m in layered.modules())
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    if experiment in ("cls_digits", "lm_small"):  # the bench's pairs: sized to match
        assert abs(n(layered) / n(deq) - 1) < 0.03, (n(layered), n(deq))
