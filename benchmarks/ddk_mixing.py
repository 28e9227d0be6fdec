"""DDK domain mixing vs natural and equal sampling, same budget, on ../shared/data/t0mix (nine unbalanced domains).

Exact command (from the repository root, after `make install`):

    .venv/bin/python benchmarks/ddk_mixing.py

Setup: the demo teacher (SmolLM2-135M-Instruct) and its 9-layer pruned student; training data = t0mix train
with its own responses; loss = CE + 0.2·KL(teacher‖student) (`configs/ddk.yaml`); the same seed, steps, batch,
lengths and learning rate for every strategy; only `data.mixing.strategy` differs. DDK's validation set =
t0mix validation (first ``--val-per-domain`` examples of each domain). Held-out metric = per-domain perplexity
ratio student/teacher on t0mix test (first ``--test-per-domain`` examples per domain, teacher-forced on the
references); the teacher's test perplexities are measured once. Writes
``benchmarks/results/ddk_mixing_cpu.{json,md}`` and the DDK run's weight plot.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from kdlm.config import Config, validate
from kdlm.data import read_examples, tokenize_examples
from kdlm.eval.teacher_forced import teacher_forced_metrics
from kdlm.models import load_model, load_models
from kdlm.train.loop import distill

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "t0mix"


def per_domain(items, limit):
    kept, out = {}, []
    for item in items:
        kept[item.domain] = kept.get(item.domain, 0) + 1
        if kept[item.domain] <= limit:
            out.append(item)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--interval", type=int, default=10)
    parser.add_argument("--val-per-domain", type=int, default=24)
    parser.add_argument("--test-per-domain", type=int, default=40)
    parser.add_argument("--strategies", default="natural,equal,ddk")
    parser.add_argument("--max-prompt-length", type=int, default=128)
    parser.add_argument("--max-length", type=int, default=192)
    parser.add_argument("--work", default="runs/bench-ddk")
    parser.add_argument("--out", default="benchmarks/results/ddk_mixing_cpu")
    args = parser.parse_args()

    def config(strategy: str) -> Config:
        cfg = Config()
        cfg.data.train = str(DATA / "train.jsonl")
        cfg.data.eval = str(DATA / "test.jsonl")
        cfg.data.responses = "dataset"
        cfg.data.max_prompt_length = args.max_prompt_length
        cfg.data.max_length = args.max_length
        cfg.data.mixing.strategy = strategy
        cfg.data.mixing.interval = args.interval
        cfg.data.mixing.validation = str(DATA / "validation.jsonl") if strategy != "none" else None
        cfg.data.mixing.val_per_domain = args.val_per_domain
        cfg.objective.kd_ratio = 0.2 / 1.2  # CE + 0.2 KL, up to a constant factor
        cfg.train.max_steps = args.steps
        cfg.train.batch_size = args.batch_size
        cfg.train.lr = 3e-4
        cfg.train.log_every = 5
        cfg.train.output_dir = f"{args.work}/{strategy}"
        cfg.eval.enabled = False
        return validate(cfg)

    base = config("natural")
    models = load_models(base)
    tokenizer, vocab = models.tokenizer, models.vocab_size
    examples, _ = read_examples(base.data.eval, base.data)
    items, _ = tokenize_examples(examples, tokenizer, max_prompt_length=base.data.max_prompt_length,
                                 max_length=base.data.max_length)
    test_items = per_domain(items, args.test_per_domain)
    domains = sorted({item.domain for item in test_items})

    def perplexities(lm) -> dict[str, float]:
        result = teacher_forced_metrics(lm, None, test_items, vocab_size=vocab, pad_id=tokenizer.pad_token_id)
        return {d: math.exp(result[f"domain/{d}"]["student_ce"]) for d in domains}

    started = time.time()
    teacher_ppl = perplexities(models.teacher)
    rows = {"untrained student": {d: p / teacher_ppl[d] for d, p in perplexities(models.student).items()}}
    del models
    timings = {}
    for strategy in args.strategies.split(","):
        cfg = config(strategy)
        shutil.rmtree(cfg.train.output_dir, ignore_errors=True)
        t0 = time.time()
        distill(cfg)
        timings[strategy] = time.time() - t0
        student = load_model(f"{cfg.train.output_dir}/final", dtype="float32")
        rows[strategy] = {d: p / teacher_ppl[d] for d, p in perplexities(student).items()}
        print(strategy, json.dumps(rows[strategy]), flush=True)

    summary = {
        name: {"worst": max(r.values()), "worst_domain": max(r, key=r.get), "mean": statistics.mean(r.values())}
        for name, r in rows.items()
    }
    result = {
        "command": "python benchmarks/ddk_mixing.py " + " ".join(sys.argv[1:]),
        "args": vars(args), "teacher_test_ppl": teacher_ppl, "ratios": rows, "summary": summary,
        "train_seconds": timings, "wall_seconds": time.time() - started,
        "torch": torch.__version__,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    if Path(f"{args.work}/ddk/mixing.png").is_file():
        shutil.copy(f"{args.work}/ddk/mixing.png", out.with_name(out.name + "_weights.png"))
    header = "| domain | teacher test ppl | " + " | ".join(rows) + " |"
    lines = [
        f"Per-domain held-out perplexity ratio student/teacher (lower is better) on t0mix test "
        f"(≤ {args.test_per_domain} per domain), after {args.steps} steps of batch {args.batch_size} (DDK interval "
        f"{args.interval}, {args.val_per_domain} validation examples per domain), same seed; prompts ≤ "
        f"{args.max_prompt_length} tokens, sequences ≤ {args.max_length}; "
        "CE + 0.2·KL; demo teacher, 9-layer pruned student.",
        "",
        header,
        "|" + "---|" * (len(rows) + 2),
    ]
    for d in domains:
        lines.append(f"| {d} | {teacher_ppl[d]:.2f} | " + " | ".join(f"{rows[n][d]:.2f}" for n in rows) + " |")
    lines.append("| **worst** | | " + " | ".join(f"**{summary[n]['worst']:.2f}** ({summary[n]['worst_domain']})" for n in rows) + " |")
    lines.append("| **mean** | | " + " | ".join(f"**{summary[n]['mean']:.2f}**" for n in rows) + " |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
