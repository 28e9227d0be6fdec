"""Evaluation during and after training: teacher-forced metrics, sample generations, a printed table."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

from kdlm.config import Config
from kdlm.data import render_prompt
from kdlm.data.format import Tokenized
from kdlm.data.sources import Example
from kdlm.eval.teacher_forced import teacher_forced_metrics
from kdlm.generation import generate
from kdlm.formatting import format_change

log = logging.getLogger("kdlm")


def evaluate_and_report(
    student_lm,
    *,
    tag: str,
    cfg: Config,
    teacher,
    tokenizer,
    vocab_size: int,
    eval_items: list[Tokenized],
    eval_examples: list[Example],
    run_dir: Path,
    accelerator=None,
    samples: bool = True,
    every_process: bool = False,
) -> Optional[dict]:
    """Held-out KL(teacher ‖ student) and cross-entropies, plus a few greedy student generations.

    Writes ``eval_<tag>.json`` in the run directory (main process) and returns the result. Only the main process
    evaluates, unless ``every_process`` (train.parallel fsdp: the sharded models' forward hooks may communicate, so
    every process must run the same forwards; each computes the same result, the main process writes it).
    """
    main = accelerator is None or accelerator.is_main_process
    if not main and not every_process:
        return None
    result = teacher_forced_metrics(
        student_lm, teacher, eval_items, vocab_size=vocab_size, pad_id=tokenizer.pad_token_id, batch_size=cfg.eval.batch_size
    )
    overall = result["overall"]
    log.info(
        "eval %s: KL(teacher||student) %.4f nats/token, student CE %.4f, teacher CE %.4f over %d tokens",
        tag, overall.get("kl", float("nan")), overall["student_ce"], overall.get("teacher_ce", float("nan")), overall["tokens"],
    )
    if samples and cfg.eval.num_samples > 0:
        picked = eval_examples[: cfg.eval.num_samples]
        completions = generate(
            student_lm,
            tokenizer,
            [render_prompt(tokenizer, e.messages, cfg.data.system_prompt) for e in picked],
            max_new_tokens=cfg.eval.max_new_tokens,
            batch_size=cfg.eval.batch_size,
            progress=False,
        )
        result["samples"] = [
            {"prompt": e.messages[-1]["content"], "reference": e.response, "reference_source": e.response_source, "student": c}
            for e, c in zip(picked, completions)
        ]
    if not main:
        return None
    (run_dir / f"eval_{tag}.json").write_text(json.dumps(result, indent=1))
    return result


def format_comparison(before: dict, after: dict) -> str:
    """A small before/after table plus the samples, for the terminal and the README.

    Each sample's reference is labelled by where it came from: ``teacher:`` when the teacher wrote it,
    ``reference:`` when the dataset gave it."""
    b, a = before["overall"], after["overall"]
    lines = ["", "| held-out metric (per response token) | before | after | change |", "|---|---|---|---|"]
    for key, label in (("kl", "KL(teacher‖student), nats"), ("student_ce", "student cross-entropy"), ("teacher_ce", "teacher cross-entropy"),
                       ("mor@5", "top-5 overlap with the teacher (MOR@5)"), ("cr@5", "same top-5 list as the teacher (CR@5)")):
        if key in b and key in a:
            lines.append(f"| {label} | {b[key]:.4f} | {a[key]:.4f} | {format_change(b[key], a[key])} |")
    for sample_before, sample_after in zip(before.get("samples", []), after.get("samples", [])):
        source = "teacher:" if sample_before.get("reference_source") == "teacher" else "reference:"
        lines += [
            "",
            f"{'prompt:':<11}{sample_before['prompt']}",
            f"{source:<11}{sample_before['reference']}",
            f"{'before:':<11}{sample_before['student']}",
            f"{'after:':<11}{sample_after['student']}",
        ]
    return "\n".join(lines)
