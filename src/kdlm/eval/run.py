"""``kdlm eval``: teacher-forced metrics, and text metrics of the student's generations, on the held-out data.

Writes, next to the evaluated model (or in ``--out``; never inside the kdlm cache): ``eval_<name>.json`` (teacher-forced KL / cross-entropies / peak alignment per
domain, and ``generation``: ROUGE-L, exact match, distinct-1/2, self-BLEU and length per domain and overall, per
seed and as mean ± std) and ``predictions_<name>.jsonl`` (one line per prompt and seed).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from kdlm.config import Config
from kdlm.data import load_splits, tokenize_examples
from kdlm.errors import ModelError
from kdlm.data import render_prompt
from kdlm.eval.metrics import mean_std, score_texts
from kdlm.eval.heldout import evaluate_and_report
from kdlm.generation import fill_teacher_responses, generate
from kdlm.logs import setup_logging
from kdlm.models import cache_root, load_models

log = logging.getLogger("kdlm")


def eval_device() -> torch.device:
    """The device ``kdlm eval`` runs on: accelerate's choice for this process (CUDA, XPU, MPS, ..., else the CPU),
    the one ``kdlm distill`` trains on."""
    from accelerate import PartialState

    return PartialState().device


# The teacher of the last evaluate_command call, by (weights fingerprint, dtype, device): evaluating several
# students against one teacher in one process (a benchmark, a notebook) loads it once. One teacher at a time.
_kept_teacher: dict[tuple[str, str, str], nn.Module] = {}


def _teacher_key(cfg: Config, device: torch.device) -> Optional[tuple[str, str, str]]:
    from kdlm.models import teacher_fingerprint

    try:
        return teacher_fingerprint(cfg), cfg.teacher.dtype, str(device)
    except ModelError:  # no local weight files to fingerprint (e.g. a hub name not downloaded yet): not kept
        return None


def output_folder(model: Path, cfg: Config, out: Optional[str] = None) -> Path:
    """Where ``kdlm eval`` writes ``eval_<name>.json`` and ``predictions_<name>.jsonl``: ``out`` when given, else
    the model's parent folder (the run directory for ``RUN/final``), except for a model inside the kdlm cache (e.g.
    the converted GGUF teacher), whose outputs go to ``train.output_dir`` rather than among cached models."""
    if out is not None:
        return Path(out)
    if model.resolve().is_relative_to(cache_root(cfg.data.cache_dir).resolve()):
        return Path(cfg.train.output_dir)
    return model.parent


def evaluate_command(cfg: Config, model_path: Optional[str] = None, out: Optional[str] = None) -> dict:
    """Evaluate the student at ``model_path`` (default ``<train.output_dir>/final``) against ``cfg.teacher``
    on ``cfg.data``'s evaluation split, on :func:`eval_device`; writes ``eval_<name>.json`` and
    ``predictions_<name>.jsonl`` in :func:`output_folder` and prints the summary. The teacher is kept for the next
    call with the same teacher weights."""
    if not log.handlers:  # called after `distill` in one process: keep its handlers (train.log)
        setup_logging()
    path = Path(model_path or Path(cfg.train.output_dir) / "final")
    if not (path / "config.json").is_file():
        raise ModelError(f"{path}: no model here (expected config.json); pass --model or train first")
    cfg.student.init = "pretrained"
    cfg.student.name_or_path, cfg.student.keep_layers = str(path), None
    cfg.student.lora = None  # final/ holds the merged model; a fresh adapter on it would be a no-op
    device = eval_device()
    key = _teacher_key(cfg, device)
    models = load_models(cfg, teacher=_kept_teacher.get(key) if key is not None else None)
    teacher, student = models.teacher.to(device), models.student.to(device)
    _kept_teacher.clear()
    if key is not None:
        _kept_teacher[key] = teacher
    out_dir = output_folder(path, cfg, out)
    out_dir.mkdir(parents=True, exist_ok=True)
    _, eval_examples, has_responses = load_splits(cfg.data, cfg.train.seed)
    # objective.cross_tokenizer: the teacher writes with its own tokenizer, and no token-level KL is defined.
    cross_tokenizer = models.teacher_tokenizer is not None
    if not has_responses:
        fill_teacher_responses(cfg, teacher, models.teacher_tokenizer if cross_tokenizer else models.tokenizer,
                               eval_examples, "eval")
    items, counts = tokenize_examples(
        eval_examples, models.tokenizer, max_prompt_length=cfg.data.max_prompt_length,
        max_length=cfg.data.max_length, system_prompt=cfg.data.system_prompt,
    )
    log.info(counts.summary("eval data"))
    result = evaluate_and_report(
        student, tag=path.name, cfg=cfg, teacher=None if cross_tokenizer else teacher, tokenizer=models.tokenizer,
        vocab_size=models.vocab_size, eval_items=items, eval_examples=eval_examples, run_dir=out_dir,
    )
    result["generation"] = generation_metrics(cfg, student, models.tokenizer, eval_examples,
                                              out_dir / f"predictions_{path.name}.jsonl")
    (out_dir / f"eval_{path.name}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({"overall": result["overall"], "generation": result["generation"]["mean"]["overall"]}, indent=1))
    return result


def generation_metrics(cfg: Config, model, tokenizer, examples, predictions_file: Path) -> dict:
    """Generate for every held-out prompt (greedy, or one sampled run per seed) and score against the references.

    References are the examples' responses (the dataset's, or the teacher's when the data has none). Returns
    ``{"decoding", "per_seed": [score_texts(...) per run], "mean": S, "std": S}`` with ``S`` shaped like
    :func:`kdlm.eval.metrics.score_texts`'s result (std over seeds; 0 for greedy).
    """
    sample = cfg.eval.decoding == "sample"
    seeds = list(cfg.eval.seeds) if sample else [0]
    prompts = [render_prompt(tokenizer, e.messages, cfg.data.system_prompt) for e in examples]
    references = [e.response or "" for e in examples]
    domains = [e.domain for e in examples]
    runs = []
    with predictions_file.open("w") as handle:
        for seed in seeds:
            predictions = generate(
                model, tokenizer, prompts, max_new_tokens=cfg.eval.gen_max_new_tokens, batch_size=cfg.eval.batch_size,
                do_sample=sample, temperature=1.0, top_p=1.0, seed=seed,
                desc=f"eval generation (seed {seed})" if sample else "eval generation (greedy)",
            )
            for example, prediction in zip(examples, predictions):
                record = {"seed": seed if sample else None, "domain": example.domain, "origin": example.origin,
                          "prompt": example.messages[-1]["content"], "reference": example.response, "prediction": prediction}
                handle.write(json.dumps(record) + "\n")
            runs.append(score_texts(predictions, references, domains))
            log.info("eval generation%s: ROUGE-L %.2f, exact match %.2f", f" seed {seed}" if sample else "",
                     runs[-1]["overall"]["rouge_l"], runs[-1]["overall"]["exact_match"])

    def aggregate(pick) -> tuple[dict, dict]:
        mean, std = {}, {}
        for key in runs[0]["overall"]:
            m, s = mean_std([pick(run)[key] for run in runs])
            mean[key], std[key] = m, s
        return mean, std

    mean = {"overall": {}, "domains": {}}
    std = {"overall": {}, "domains": {}}
    mean["overall"], std["overall"] = aggregate(lambda run: run["overall"])
    for domain in runs[0]["domains"]:
        mean["domains"][domain], std["domains"][domain] = aggregate(lambda run, d=domain: run["domains"][d])
    return {"decoding": cfg.eval.decoding, "seeds": seeds if sample else [], "per_seed": runs, "mean": mean, "std": std}
