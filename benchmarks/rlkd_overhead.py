"""RLKD step-time overhead: a KD training step with and without the ranking term, side by side, demo setup.

Exact command (from the repository root, after `make install`):

    .venv/bin/python benchmarks/rlkd_overhead.py

Setup = the demo: teacher SmolLM2-135M-Instruct (builtin GGUF, de-quantised to float32), student = the teacher
pruned to 9 of 30 layers, the demo prompts with the teacher's cached responses, batch 8, float32, CPU.
One step = student and teacher forward, fused loss, backward, AdamW step. Every variant has its own copy of
the student and optimizer and sees the same batches; variants are interleaved step by step (so machine noise
hits them alike) and the median step time over ``--steps`` × ``--repeats`` steps is reported, with the ratio
to the plain KD step (``kd`` = forward KL, kd_ratio 1, the RLKD paper's base without the rank term).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

from kdlm.config import Config, validate
from kdlm.data import collate, load_splits, tokenize_examples
from kdlm.generation import fill_teacher_responses
from kdlm.models import load_models
from kdlm.models import DecoderOnly
from kdlm.train.objectives import make_objective

VARIANTS = {
    "kd (fkl)": {"name": "kd"},
    "rlkd k=5": {"name": "rlkd", "rank_k": 5},
    "rlkd k=5 dynamic": {"name": "rlkd", "rank_k": 5, "rank_dynamic": True},
    "rlkd k=15": {"name": "rlkd", "rank_k": 15},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="distinct batches")
    parser.add_argument("--repeats", type=int, default=2, help="passes over those batches")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default="benchmarks/results/rlkd_overhead_cpu")
    args = parser.parse_args()

    cfg = validate(Config())
    models = load_models(cfg)
    train_examples, eval_examples, _ = load_splits(cfg.data, cfg.train.seed)
    fill_teacher_responses(cfg, models.teacher, models.tokenizer, train_examples, "train")
    items, _ = tokenize_examples(
        train_examples, models.tokenizer, max_prompt_length=cfg.data.max_prompt_length, max_length=cfg.data.max_length
    )
    batches = [
        collate(items[i * args.batch_size : (i + 1) * args.batch_size], models.tokenizer.pad_token_id)
        for i in range(args.steps)
    ]
    runs = {}
    for label, overrides in VARIANTS.items():
        objective_cfg = copy.deepcopy(cfg.objective)
        objective_cfg.kd_ratio = 1.0
        for key, value in overrides.items():
            setattr(objective_cfg, key, value)
        student = DecoderOnly(copy.deepcopy(models.student)).train()
        runs[label] = {
            "objective": make_objective(objective_cfg, models.teacher, models.vocab_size),
            "student": student,
            "optimizer": torch.optim.AdamW(student.parameters(), lr=1e-5),
            "times": [],
        }

    def step(run: dict, batch: dict) -> float:
        start = time.perf_counter()
        out = run["objective"](run["student"], batch)
        tokens = int((batch["labels"][:, 1:] != -100).sum())
        (out.loss_sum / tokens).backward()
        run["optimizer"].step()
        run["optimizer"].zero_grad(set_to_none=True)
        return time.perf_counter() - start

    for run in runs.values():  # warm-up (allocator, first-call costs), not timed
        step(run, batches[0])
    for _ in range(args.repeats):
        for batch in batches:
            for run in runs.values():
                run["times"].append(step(run, batch))

    base = statistics.median(runs["kd (fkl)"]["times"])
    tokens = [int((b["labels"][:, 1:] != -100).sum()) for b in batches]
    rows = []
    for label, run in runs.items():
        median = statistics.median(run["times"])
        rows.append({"variant": label, "median_step_s": median, "ratio_to_kd": median / base,
                     "min_step_s": min(run["times"]), "steps": len(run["times"])})
    result = {
        "command": "python benchmarks/rlkd_overhead.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "batch_size": args.batch_size,
        "response_tokens_per_batch": tokens,
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = [
        f"RLKD step-time overhead, demo setup (SmolLM2-135M teacher, 9-layer pruned student), batch {args.batch_size}, "
        f"float32, {result['machine']}; median of {rows[0]['steps']} interleaved steps.",
        "",
        "| variant | median step (s) | × kd step |",
        "|---|---|---|",
    ]
    lines += [f"| {r['variant']} | {r['median_step_s']:.3f} | {r['ratio_to_kd']:.3f} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
