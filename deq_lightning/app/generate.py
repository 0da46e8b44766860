"""``generate.py``: sample text from a trained language model, carrying its DEQ memory."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig

from deq_lightning.app.console import say
from deq_lightning.app.inference import TextGenerator
from deq_lightning.app.runs import run_from
from deq_lightning.tasks.language import LanguageModelTask

GENERATE_OWN_KEYS = {"prompt", "n_tokens", "temperature", "top_k", "seed"}


def generate_text(cfg: DictConfig) -> str:
    """Load an LM run's checkpoint and vocabulary, sample from ``cfg.prompt``, print and save."""
    run = run_from(cfg, "generate.py", skip=GENERATE_OWN_KEYS)
    task_cls = run.task_class(LanguageModelTask, "generate.py needs a language model")
    lm = TextGenerator(run, run.load_task(task_cls))
    top_k = None if cfg.top_k is None else int(cfg.top_k)
    text = lm.predict(cfg.prompt, int(cfg.n_tokens), float(cfg.temperature), top_k, int(cfg.seed))
    out = Path(cfg.paths.output_dir) / "generated.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tokens = [lm.vocab.words[i] for i in lm.last_ids.tolist()]
    out.write_text(json.dumps({"prompt": cfg.prompt, "tokens": tokens, "text": text}, indent=1))
    say(f"prompt: {cfg.prompt}")
    say(f"sample: {text}")
    say(f"written to {out.resolve()}")
    return text
