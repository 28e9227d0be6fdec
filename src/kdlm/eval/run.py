"""``kdlm eval``: teacher-forced metrics and samples for a trained student on the held-out data."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

from kdlm.config import Config
from kdlm.data import load_splits, tokenize_examples
from kdlm.errors import ModelError
from kdlm.eval.report import evaluate_and_report
from kdlm.generation import fill_teacher_responses
from kdlm.models import load_models

log = logging.getLogger("kdlm")


def evaluate_command(cfg: Config, model_path: Optional[str] = None) -> dict:
    """Evaluate the student at ``model_path`` (default ``<train.output_dir>/final``) against ``cfg.teacher``
    on ``cfg.data``'s evaluation split; writes ``eval_<name>.json`` next to the model and prints the summary."""
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    path = Path(model_path or Path(cfg.train.output_dir) / "final")
    if not (path / "config.json").is_file():
        raise ModelError(f"{path}: no model here (expected config.json); pass --model or train first")
    cfg.student.init = "pretrained"
    cfg.student.name_or_path, cfg.student.keep_layers = str(path), None
    models = load_models(cfg)
    _, eval_examples, has_responses = load_splits(cfg.data, cfg.train.seed)
    if not has_responses:
        fill_teacher_responses(cfg, models.teacher, models.tokenizer, eval_examples, "eval")
    items, counts = tokenize_examples(
        eval_examples, models.tokenizer, max_prompt_length=cfg.data.max_prompt_length,
        max_length=cfg.data.max_length, system_prompt=cfg.data.system_prompt,
    )
    log.info(counts.summary("eval data"))
    result = evaluate_and_report(
        models.student, tag=path.name, cfg=cfg, teacher=models.teacher, tokenizer=models.tokenizer,
        vocab_size=models.vocab_size, eval_items=items, eval_examples=eval_examples, run_dir=path.parent,
    )
    print(json.dumps({"overall": result["overall"], "samples": result.get("samples", [])}, indent=1))
    return result
