"""``predict_flow.py``: optical flow for the user's own frames with a trained flow run.

Frames come from two (or more) image files, a folder of frames (sorted by name) or a video file;
each consecutive pair gets ``flo/<name>.flo`` (Middlebury format, what Sintel's server takes) and
``color/<name>.png`` (the Middlebury colour wheel), ``<name>`` being the first frame's. Along a
sequence the solver starts from the previous pair's fixed point carried forward by its own flow
(:func:`~deq_lightning.models.deq_flow.forward_interpolate`): the thesis's warm start, which
needs fewer solver steps when motion is smooth.

Full-size photographs: the all-pairs correlation volume grows with the square of the pixel count
(``(H/8 * W/8)**2`` float32 values at its finest level: about 212 GiB for a 13-megapixel pair, per
reports/flow/predict_memory.json), so
``max_side=N`` downscales frames whose longer side exceeds N (antialiased), solves there, and
upsamples the flow back to the input size, its vectors multiplied by the size ratio of their axis.
Without it, a pair whose volume would not fit in the device's available memory is refused with
the ``max_side`` and the ``tile`` that fit. ``tile=N`` instead keeps the resolution and solves
the frame in overlapping N x N tiles (:class:`Tiling`): each tile pair on its own (``tile_batch``
per forward), their flows blended with weights that fall off towards the tiles' inner sides. A tile
sees nothing beyond itself, so motion that carries a pixel out of its tile cannot be matched
there: a pixel whose motion of m px leaves a tile takes at most m / (tile_overlap + 1) of its flow
from that tile, and motion beyond the overlap is lost near the seams; for large motion combine
``tile`` with ``max_side`` (downscaling shrinks the motion in pixels). Along a sequence each tile
is warm-started from its own previous fixed point (the tiles are the same for every pair).
Measured memory and time: ``reports/flow/predict_memory.json`` (``python bench/flow.py
--predict-memory``), quoted in docs/speed.md.

``benchmark=true`` instead writes the submission files of the run's benchmark test sets
(``data.predict_sets``: Sintel ``.flo`` per pass and scene, KITTI 16-bit PNGs), warm-started
along Sintel's scenes on one device.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from PIL import Image
from torchvision.utils import flow_to_image

from deq_lightning.app.build import predict_to
from deq_lightning.app.console import say
from deq_lightning.app.flow_frames import (
    Tiling,
    check_frame_size,
    plan_tiling,
    solve_within,
    tile_options,
    tiling_note,
)
from deq_lightning.app.runs import Run, run_from
from deq_lightning.callbacks.flow import FlowSubmissionWriter
from deq_lightning.datamodules.flow_io import write_flo
from deq_lightning.deq import DEQStats
from deq_lightning.models.deq_flow import forward_interpolate
from deq_lightning.tasks.flow import FlowTask

PREDICT_OWN_KEYS = {
    "input",
    "output_dir",
    "warm_start",
    "device",
    "max_frames",
    "benchmark",
    "max_side",
    "tile",
    "tile_overlap",
    "tile_batch",
}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".ppm", ".bmp", ".tif", ".tiff", ".webp"}


@dataclass
class PairResult:
    """What happened for one frame pair (also written to ``summary.json``)."""

    name: str
    flo: str
    color: str
    warm_start: bool  # this pair's solve started from the previous pair's fixed point
    solver_steps: float | None  # f evaluations run (None: an explicit model such as RAFT)
    rel_residual: float | None  # of the returned iterate (mean over the tiles)
    best_step: float | None = None  # the iteration the returned (lowest-residual) iterate is from
    converged: bool | None = None  # the solve (every tile's) met its tolerance within its budget
    max_iter: int | None = None  # the solver's budget
    solved_size: list[int] | None = None  # (H, W) the model ran at (smaller with max_side)
    tiles: int = 1  # solves the pair took (1: the whole frame at once); the means are over them
    tiles_converged: int | None = None  # of those solves, how many met the tolerance
    tiling: dict | None = None  # tile=: {"tile_size": [H, W], "overlap": px, "batch": per forward}


def solver_summary(results: Sequence[PairResult]) -> str:
    """What the solver did over the pairs (empty for an explicit model): steps run, the step of
    the returned iterate, converged fraction, residual and how many pairs were warm-started.
    Tiled pairs count every tile's solve."""
    solved = [r for r in results if r.solver_steps is not None]
    if not solved:
        return ""
    warm = sum(r.warm_start for r in solved)
    tiles = sum(r.tiles for r in solved)
    converged = sum(
        int(r.converged) if r.tiles_converged is None else r.tiles_converged for r in solved
    )
    tiled = any(r.tiling is not None for r in solved)
    unit = f"tiles ({tiles / len(solved):g} per pair)" if tiled else "pairs"
    return (
        f"; solver: {sum(r.solver_steps * r.tiles for r in solved) / tiles:.1f} steps run of "
        f"{solved[0].max_iter} (returned iterate from step "
        f"{sum(r.best_step * r.tiles for r in solved) / tiles:.1f}), {converged}/{tiles} {unit} "
        f"converged, relative residual median {np.median([r.rel_residual for r in solved]):.3g}; "
        f"{warm}/{len(solved)} pairs warm-started"
    )


# ------------------------------------------------------------------------------ frames


def _rgb(array: np.ndarray) -> np.ndarray:
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    return np.ascontiguousarray(array[..., :3]).astype(np.uint8)


def read_video(path: Path) -> Iterator[np.ndarray]:
    """Frames of a video file through imageio (pyav / ffmpeg plugins; GIFs need only Pillow)."""
    try:
        import imageio.v3 as iio

        frames = iio.imiter(path)
        first = next(frames)
    except Exception as e:  # imageio raises a variety of errors when no plugin can decode
        raise RuntimeError(
            f"cannot decode the video {path}: {type(e).__name__}: {e}\n"
            "Install a video backend (pip install av, or pip install imageio-ffmpeg), or extract "
            f"the frames to a folder (ffmpeg -i {path} frames/%06d.png) and pass input=frames"
        ) from None
    yield _rgb(np.asarray(first))
    for frame in frames:
        yield _rgb(np.asarray(frame))


def frame_source(source: str | Sequence[str]) -> tuple[list[str] | None, Iterator[np.ndarray]]:
    """``(names, frames)`` of ``input``: a list of image files, a folder or a video file.

    ``names`` is ``None`` for a video (its frames are then named ``frame_000000``, ...).
    """
    if isinstance(source, str | Path):
        path = Path(source).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if len(files) < 2:
                raise ValueError(
                    f"input={source}: a folder needs at least 2 frames ({sorted(IMAGE_SUFFIXES)}),"
                    f" found {len(files)}"
                )
        elif path.is_file():
            if path.suffix.lower() in IMAGE_SUFFIXES:
                raise ValueError(
                    f"input={source} is a single image; give two: input=[first.png,second.png]"
                )
            return None, read_video(path)
        else:
            raise FileNotFoundError(f"input={source} does not exist")
    else:
        files = [Path(p).expanduser() for p in source]
        missing = [str(p) for p in files if not p.is_file()]
        if missing or len(files) < 2:
            raise ValueError(
                f"input needs at least two image files; missing: {missing}, given: {len(files)}"
            )
    return [p.stem for p in files], (_rgb(np.asarray(Image.open(p).convert("RGB"))) for p in files)


# ------------------------------------------------------------------------------ the model


def load_flow_task(run: Run) -> FlowTask:
    """The trained task; solver keys given on the command line (``solver.eval_opts.max_iter``)
    replace the run's when its saved config is there."""
    overrides = {}
    if run.cfg is not None:
        run.task_class(FlowTask, "predict_flow.py needs a flow run")
        overrides = {"solver": OmegaConf.to_container(run.cfg.solver, resolve=True)}
    say(f"loading {run.ckpt}")
    return run.load_task(FlowTask, **overrides)


def pick_device(name: str) -> torch.device:
    """``device=auto``: the GPU when there is one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def to_batch(frame: np.ndarray, device: torch.device) -> torch.Tensor:
    """An ``(H, W, 3)`` uint8 frame -> a ``(1, 3, H, W)`` float batch in [0, 255] (the flow
    models normalise inside)."""
    return torch.from_numpy(frame).permute(2, 0, 1)[None].float().to(device)


# ------------------------------------------------------------------------------ prediction


def predict_benchmark(run: Run, cfg: DictConfig) -> list[Path]:
    """Submission files for the run's benchmark test sets; returns the files written."""
    run_cfg = run.config
    datamodule = run.datamodule()
    if not run_cfg.data.get("predict_sets"):
        raise ValueError(
            "benchmark=true needs benchmark test sets: a run on data=sintel, kitti or flow_mix "
            "(or set data.predict_sets=[sintel_test_clean,sintel_test_final] / [kitti_test])"
        )
    task = load_flow_task(run)
    out = Path(cfg.output_dir or Path(cfg.paths.output_dir) / "submission")
    writer = FlowSubmissionWriter(str(out))
    say(f"predicting {list(run_cfg.data.predict_sets)} with {task.pad_mode} padding")
    predict_to(writer, run_cfg, task, datamodule=datamodule)
    say(f"{len(writer.written)} flow files written to {out.resolve()}")
    return writer.written


@torch.no_grad()
def predict_flow(cfg: DictConfig) -> list[PairResult] | list[Path]:
    """Write ``.flo`` and colour PNGs for every consecutive pair of ``cfg.input`` (or, with
    ``benchmark=true``, the submission files of the run's benchmark test sets)."""
    run = run_from(cfg, "predict_flow.py", skip=PREDICT_OWN_KEYS)
    if cfg.get("benchmark"):
        return predict_benchmark(run, cfg)
    if not cfg.get("input"):
        raise ValueError(
            "predict_flow.py needs input=<folder of frames> | input=<video> | "
            "input=[first.png,second.png]"
        )
    max_side = cfg.get("max_side")
    if max_side is not None and (type(max_side) is not int or max_side < 1):
        raise ValueError(f"max_side={max_side!r}: give a positive number of pixels, or null")
    source = cfg.input
    source = list(source) if isinstance(source, ListConfig | list | tuple) else str(source)
    names, frames = frame_source(source)
    device = pick_device(str(cfg.get("device", "auto")))
    task = load_flow_task(run).to(device)
    out_dir = Path(cfg.output_dir or Path(cfg.paths.output_dir) / "flow")
    (out_dir / "flo").mkdir(parents=True, exist_ok=True)
    (out_dir / "color").mkdir(parents=True, exist_ok=True)
    warm, max_frames = bool(cfg.get("warm_start", True)), cfg.get("max_frames")
    corr_levels = task.model.corr_levels
    tiles = tile_options(cfg, corr_levels)
    results: list[PairResult] = []
    prev, prev_low, run_size, tiling = None, None, None, None
    for i, frame in enumerate(frames):
        if max_frames is not None and i >= int(max_frames):
            break
        if prev is not None and prev.shape != frame.shape:
            raise ValueError(
                f"frame {i} has size {frame.shape[:2]}, frame {i - 1} {prev.shape[:2]}: "
                "all frames of a sequence must have one size"
            )
        if prev is not None:
            if run_size is None:
                tile = tiles[0] if tiles else None
                run_size = check_frame_size(frame.shape[:2], max_side, corr_levels, device, tile)
                if tiles:
                    tiling = plan_tiling(run_size, *tiles, corr_levels, device)
                    say(tiling_note(tiling, run_size, corr_levels, device))
            init = forward_interpolate(prev_low) if warm and prev_low is not None else None
            img1, img2 = to_batch(prev, device), to_batch(frame, device)
            solve = solve_within(task, img1, img2, run_size, init, tiling)
            name = names[i - 1] if names is not None else f"frame_{i - 1:06d}"
            results.append(
                write_pair(
                    out_dir, name, solve.flow[0], solve.stats, init is not None, run_size, tiling
                )
            )
            prev_low = solve.flow_low
        prev = frame
    if not results:
        raise ValueError(f"input={cfg.input}: fewer than 2 frames")
    (out_dir / "summary.json").write_text(json.dumps([asdict(r) for r in results], indent=1))
    say(
        f"{len(results)} flows written to {out_dir.resolve()} (flo/, color/){solver_summary(results)}"
    )
    return results


def write_pair(
    out_dir: Path,
    name: str,
    flow: torch.Tensor,
    stats: Sequence[DEQStats],
    warm: bool,
    solved_size: Sequence[int],
    tiling: Tiling | None = None,
) -> PairResult:
    """Write one pair's ``.flo`` and colour PNG; what its solves (one per tile) did."""
    flo, color = out_dir / "flo" / f"{name}.flo", out_dir / "color" / f"{name}.png"
    flow = flow.float().cpu()
    write_flo(flo, flow.permute(1, 2, 0).numpy())
    Image.fromarray(flow_to_image(flow).permute(1, 2, 0).numpy()).save(color)
    return PairResult(
        name=name,
        flo=str(flo),
        color=str(color),
        warm_start=warm,
        solved_size=list(solved_size),
        tiles=1 if tiling is None else len(tiling.boxes),
        tiling=None
        if tiling is None
        else {"tile_size": list(tiling.shape), "overlap": tiling.overlap, "batch": tiling.batch},
        **solver_fields(stats),
    )


def solver_fields(stats: Sequence[DEQStats]) -> dict:
    """:class:`PairResult`'s solver fields over every sample of every forward: one per tile."""
    if not stats:  # an explicit model (RAFT) has no solve to report
        return {"solver_steps": None, "rel_residual": None}

    def per_solve(key: str) -> torch.Tensor:
        return torch.cat([getattr(s.forward, key).flatten().float().cpu() for s in stats])

    converged = per_solve("converged")
    return {
        "solver_steps": float(per_solve("steps").mean()),
        "rel_residual": float(per_solve("rel_res").mean()),
        "best_step": float(per_solve("nstep").mean()),
        "converged": bool(converged.all()),
        "tiles_converged": int(converged.sum()),
        "max_iter": int(stats[0].forward.max_iter),
    }
