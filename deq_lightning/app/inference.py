"""Predictions from a trained run in Python, outside any Trainer: :func:`deq_lightning.load`.

.. code-block:: python

    import deq_lightning
    model = deq_lightning.load("logs/train/runs/2026-11-29_10-00-00")  # or a .ckpt inside it
    labels = model.predict(images)

``load`` reads the run's saved config (``.hydra/config.yaml``) and its best checkpoint (else
``checkpoints/last.ckpt``; a ``.ckpt`` path picks that one) and returns the predictor of the
run's task family, its model in eval mode on ``device``:

* classification (:class:`Classifier`): ``predict(images)`` -> class indices ``(N,)``;
  ``predict_proba(images)`` -> probabilities ``(N, K)``;
* segmentation (:class:`Segmenter`): ``predict(images)`` -> class masks ``(N, H, W)`` at the
  input resolution (the run's ``task.test_scales`` / ``task.test_flip`` views);
  ``predict_proba(images)`` -> ``(N, K, H, W)``;
* optical flow (:class:`FlowEstimator`): ``predict(frame1, frame2)`` -> flow ``(N, 2, H, W)``
  (x, y in pixels), padded as the run's ``task.pad_mode`` says;
* language model (:class:`TextGenerator`): ``predict(prompt)`` -> the sampled continuation
  (text), in the vocabulary of the run's data.

Inputs are tensors as the run's DataModule serves them to the model: classification and
segmentation images normalised as its loaders do (``ImageFiles`` in
:mod:`deq_lightning.datamodules.segmentation` reads image files that way), flow frames as RGB
values in [0, 255] (the flow models normalise inside). A single image ``(C, H, W)`` (or frame
pair) gives a single answer, without the batch dimension. Outputs are on the CPU.

A DEQ's answer is only the thesis's when it is at its fixed point: after every call,
``converged`` is the fraction of samples (tokens for text) whose forward solve met its
tolerance (``None`` for an explicit model) and ``last_stats`` the solves' diagnostics; below the
run's ``callbacks.equilibrium.min_converged`` a :class:`NotAtEquilibriumWarning` says so and
names the settings that help.
"""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import Tensor

from deq_lightning.app.runs import Run, load_run
from deq_lightning.callbacks.equilibrium import EquilibriumMonitor, remedies
from deq_lightning.deq import DEQ, DEQStats
from deq_lightning.tasks.base import DEQTask
from deq_lightning.tasks.classification import ClassificationTask
from deq_lightning.tasks.flow import FlowTask
from deq_lightning.tasks.language import LanguageModelTask
from deq_lightning.tasks.segmentation import SegmentationTask

MIN_CONVERGED = inspect.signature(EquilibriumMonitor).parameters["min_converged"].default


class NotAtEquilibriumWarning(UserWarning):
    """Fewer samples than the run's ``min_converged`` reached their fixed point."""


class Predictor:
    """A trained task in eval mode on ``device``, and the equilibrium of its last call."""

    def __init__(self, run: Run, task: DEQTask, device: str | torch.device = "cpu") -> None:
        self.run, self.device = run, torch.device(device)
        self.task = task.to(self.device).eval()
        key = "callbacks.equilibrium.min_converged"
        self.min_converged = float(OmegaConf.select(run.config, key, default=MIN_CONVERGED))
        self.last_stats: list[DEQStats] = []
        self.converged: float | None = None

    def record(self, stats: list[DEQStats | None]) -> None:
        """Keep the solves' diagnostics; warn when too few samples reached their fixed point."""
        self.last_stats = [s for s in stats if s is not None]
        if not self.last_stats:
            self.converged = None  # an explicit model: no equilibrium to reach
            return
        flags = torch.cat([s.forward.converged.flatten().float().cpu() for s in self.last_stats])
        self.converged = float(flags.mean())
        if self.converged < self.min_converged:
            warnings.warn(self.not_at_equilibrium(), NotAtEquilibriumWarning, stacklevel=3)

    def not_at_equilibrium(self) -> str:
        """The warning: how far from equilibrium the last call was, and the remedies."""
        deq = next(m for m in self.task.model.modules() if isinstance(m, DEQ))
        summary = {"solver": deq.active_solver(), **deq.active_solver_opts()}
        return (
            f"{self.run.run_dir}: {self.converged:.1%} of the samples reached their fixed point, "
            f"below the run's {self.min_converged:.0%} (callbacks.equilibrium.min_converged): "
            "these outputs are an unrolled network's, not an equilibrium's. Try: "
            + "; ".join(remedies(self.task, summary, "predict"))
        )

    def images(self, x: Tensor, name: str = "images") -> tuple[Tensor, bool]:
        """``x`` as a float batch on the device, and whether it was a single image; an error
        naming the expected shape when it is not ``(N, C, H, W)`` or ``(C, H, W)``."""
        x = torch.as_tensor(x)
        channels = self.task.hparams.model.get("in_channels", 3)
        single = x.dim() == 3
        batch = x[None] if single else x
        if batch.dim() != 4 or batch.shape[1] != channels:
            raise ValueError(
                f"{name} must have shape (N, {channels}, H, W) or ({channels}, H, W) for the "
                f"model of {self.run.run_dir}; got {tuple(x.shape)}"
            )
        return batch.to(self.device, torch.float32), single


class Classifier(Predictor):
    """Image classification: class indices and probabilities."""

    @torch.no_grad()
    def predict_proba(self, images: Tensor) -> Tensor:
        """Class probabilities ``(N, K)`` (``(K,)`` for one image)."""
        x, single = self.images(images)
        logits, stats = self.task.run_model(x)
        self.record([stats])
        probs = logits.float().softmax(-1).cpu()
        return probs[0] if single else probs

    def predict(self, images: Tensor) -> Tensor:
        """Class indices ``(N,)`` int64 (a 0-d tensor for one image)."""
        return self.predict_proba(images).argmax(-1)


class Segmenter(Predictor):
    """Semantic segmentation: per-pixel classes at the input resolution."""

    @torch.no_grad()
    def predict_proba(self, images: Tensor) -> Tensor:
        """Class probabilities ``(N, K, H, W)`` (``(K, H, W)`` for one image), averaged over the
        run's test views (``task.test_scales`` x ``task.test_flip``)."""
        x, single = self.images(images)
        task = self.task
        probs, stats = task.predict_probs(x, x.shape[-2:], task.test_scales, task.test_flip)
        self.record([stats])
        probs = probs.cpu()
        return probs[0] if single else probs

    def predict(self, images: Tensor) -> Tensor:
        """Class masks ``(N, H, W)`` int64 (``(H, W)`` for one image)."""
        return self.predict_proba(images).argmax(-3)


class FlowEstimator(Predictor):
    """Optical flow between two frames."""

    @torch.no_grad()
    def predict(self, frame1: Tensor, frame2: Tensor) -> Tensor:
        """Flow ``(N, 2, H, W)`` float32 from ``frame1`` to ``frame2`` (``(2, H, W)`` for one
        pair); frames ``(N, 3, H, W)`` or ``(3, H, W)``, RGB in [0, 255]."""
        img1, single = self.images(frame1, "frame1")
        img2, _ = self.images(frame2, "frame2")
        if img1.shape != img2.shape:
            raise ValueError(
                f"frame1 and frame2 must have one shape, got {tuple(img1.shape)} and "
                f"{tuple(img2.shape)}"
            )
        out, stats = self.task.solve(img1, img2)
        self.record([stats])
        flow = out["flow"].float().cpu()
        return flow[0] if single else flow


class TextGenerator(Predictor):
    """A language model sampling continuations in its run's vocabulary."""

    def __init__(self, run: Run, task: DEQTask, device: str | torch.device = "cpu") -> None:
        super().__init__(run, task, device)
        datamodule = run.datamodule()
        datamodule.setup("test")  # builds the vocabulary from the run's training split
        self.vocab = datamodule.vocab
        self.unk_policy = getattr(datamodule, "unk_policy", "error")
        self.last_ids = torch.empty(0, dtype=torch.long)

    @torch.no_grad()
    def predict(
        self,
        prompt: str,
        n_tokens: int = 20,
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int = 0,
    ) -> str:
        """The continuation of ``prompt`` (words separated by spaces, ``<eos>`` as line breaks),
        sampled at ``temperature`` from the ``top_k`` likeliest words; ``seed`` makes it
        repeatable. Unknown prompt words are an error unless the run maps them
        (``data.unk_policy=map``). ``last_ids`` keeps the sampled ids."""
        ids = self.vocab.encode(prompt, "prompt", self.unk_policy)
        generator = torch.Generator().manual_seed(seed)
        self.last_ids, stats = self.task.generate(ids, n_tokens, temperature, top_k, generator)
        self.record(stats)
        return self.vocab.decode(self.last_ids)


FAMILIES: dict[type[DEQTask], type[Predictor]] = {
    ClassificationTask: Classifier,
    SegmentationTask: Segmenter,
    FlowTask: FlowEstimator,
    LanguageModelTask: TextGenerator,
}


def load(run_dir_or_ckpt: str | Path, device: str | torch.device = "cpu") -> Predictor:
    """The predictor of a trained run (a ``train.py`` run directory, or a ``.ckpt`` file in
    one's ``checkpoints/``), on ``device``. See this module's docstring for what it predicts."""
    run = load_run(run_dir_or_ckpt)
    cls = run.task_class()
    predictor = next((p for family, p in FAMILIES.items() if issubclass(cls, family)), None)
    if predictor is None:
        names = ", ".join(f.__name__ for f in FAMILIES)
        raise ValueError(
            f"{run.run_dir} is a {cls.__name__} run; deq_lightning.load predicts for {names}"
        )
    return predictor(run, run.load_task(cls), device)


__all__ = [
    "Classifier",
    "FlowEstimator",
    "NotAtEquilibriumWarning",
    "Predictor",
    "Segmenter",
    "TextGenerator",
    "load",
]
