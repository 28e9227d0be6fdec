"""Offline teacher cache on the demo setup: bytes per token, caching throughput, step time, and student quality.

Exact command (from the repository root, after `make install`):

    .venv/bin/python benchmarks/teacher_cache.py

Setup: the demo (SmolLM2-135M-Instruct teacher, its 9-layer pruned student, the built-in prompts with the
teacher's cached responses, batch 8, max length 384, float32, this CPU). For each cache setting
(``topk`` k = 8, 24, 32, 128; ``sampled`` 12 draws):

1. ``kdlm cache-teacher`` from scratch: bytes per response token on disk (shards, index included) and teacher
   tokens per second while caching.
2. The quality of a student trained from that cache with the demo's budget (1 epoch, FKL with kd_ratio 0.5),
   next to the same student trained with the live dense teacher: held-out per-token KL(teacher ‖ student) on
   the 48 held-out prompts (teacher-forced on the teacher's responses, live teacher) and ROUGE-L of the
   student's greedy generations (64 new tokens) against the teacher's responses.
3. Step time, in one process with the variants interleaved step by step on the same batches: a KD step from the
   cache (``--timing-setting``), a KD step with the live teacher, and a plain SFT step (forward, loss, backward,
   AdamW), median over ``--timing-steps`` steps after one warm-up step each.

Writes ``benchmarks/results/teacher_cache_cpu.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

from kdlm.cache import TeacherCache, build_cache
from kdlm.config import Config, validate
from kdlm.data import collate, load_splits, tokenize_examples
from kdlm.eval.run import generation_metrics
from kdlm.eval.teacher_forced import teacher_forced_metrics
from kdlm.generation import fill_teacher_responses
from kdlm.models import load_model, load_models
from kdlm.train.loop import distill
from kdlm.models import DecoderOnly
from kdlm.train.objectives import make_objective


def setting_overrides(name: str) -> dict:
    """'topk8' -> mode topk, k 8; 'sampled12' -> mode sampled, 12 draws; 'sampled12top4' also keeps the top 4."""
    if name.startswith("topk"):
        return {"mode": "topk", "k": int(name[4:])}
    draws, _, top = name[len("sampled"):].partition("top")
    return {"mode": "sampled", "samples": int(draws), "top": int(top or 0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", default="topk8,topk24,topk32,topk128,sampled12")
    parser.add_argument("--timing-setting", default="topk24")
    parser.add_argument("--timing-steps", type=int, default=8)
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--seeds", default="0,1,2", help="training seeds of the --seed-settings rows (mean ± std)")
    parser.add_argument("--seed-settings", default="dense,topk24,sampled12")
    parser.add_argument("--work", default="runs/bench-cache")
    parser.add_argument("--out", default="benchmarks/results/teacher_cache_cpu")
    args = parser.parse_args()
    work = Path(args.work)
    started = time.time()

    def config(setting: str | None, seed: int = 0) -> Config:
        cfg = Config()  # the demo
        cfg.train.seed = seed
        cfg.train.output_dir = str(work / f"{setting or 'dense'}{f'-seed{seed}' if seed else ''}")
        cfg.eval.enabled = False
        cfg.train.progress = False
        cfg.eval.gen_max_new_tokens = args.gen_tokens
        if setting is not None:
            # A sampled cache depends on the seed (its draws); a top-k cache does not.
            sampled_seed = f"-seed{seed}" if seed and setting.startswith("sampled") else ""
            cfg.cache.dir = str(work / f"cache-{setting}{sampled_seed}")
            for key, value in setting_overrides(setting).items():
                setattr(cfg.cache, key, value)
        return validate(cfg)

    # 1. Caching (from scratch: the throughput is measured).
    caches = {}
    for setting in args.settings.split(","):
        cfg = config(setting)
        shutil.rmtree(cfg.cache.dir, ignore_errors=True)
        for stale in work.glob(f"{setting}*/bench_quality.json"):  # a new cache: its students are retrained
            stale.unlink()
        manifest = build_cache(cfg)
        caches[setting] = {"bytes_per_token": manifest["bytes_per_token"], "tokens": manifest["tokens"],
                           "tokens_per_s": manifest["run"]["tokens_per_s"], "cache_seconds": manifest["run"]["seconds"]}
        print(setting, json.dumps(caches[setting]), flush=True)

    # 2. Quality after the same budget.
    base = config(None)
    models = load_models(base)
    teacher, tokenizer, vocab = models.teacher, models.tokenizer, models.vocab_size
    _, eval_examples, _ = load_splits(base.data, base.train.seed)
    fill_teacher_responses(base, teacher, tokenizer, eval_examples, "eval")
    eval_items, _ = tokenize_examples(eval_examples, tokenizer, max_prompt_length=base.data.max_prompt_length,
                                      max_length=base.data.max_length, system_prompt=base.data.system_prompt)

    def trained(setting: str, seed: int) -> dict:
        """Train (from the cache, or with the live teacher for 'dense') and measure; results kept for reruns."""
        cfg = config(None if setting == "dense" else setting, seed)
        done = Path(cfg.train.output_dir) / "bench_quality.json"
        if done.is_file():
            return json.loads(done.read_text())
        if cfg.cache.dir and not (Path(cfg.cache.dir) / "manifest.json").is_file():
            build_cache(cfg)
        shutil.rmtree(cfg.train.output_dir, ignore_errors=True)
        t0 = time.time()
        distill(cfg)
        row = quality(f"{setting}-seed{seed}", load_model(f"{cfg.train.output_dir}/final", dtype="float32"))
        row["train_seconds"] = time.time() - t0
        done.write_text(json.dumps(row))
        print(setting, seed, json.dumps(row), flush=True)
        return row

    def quality(run: str, lm) -> dict:
        kl = teacher_forced_metrics(lm, teacher, eval_items, vocab_size=vocab, pad_id=tokenizer.pad_token_id)["overall"]["kl"]
        gen = generation_metrics(base, lm, tokenizer, eval_examples, work / f"predictions_{run}.jsonl")
        return {"kl": kl, "rouge_l": gen["mean"]["overall"]["rouge_l"]}

    rows: dict[str, dict] = {}
    seeds: dict[str, dict] = {}
    if not args.skip_quality:
        rows["untrained student"] = quality("untrained", models.student)
        for setting in ["dense", *args.settings.split(",")]:
            rows[setting] = trained(setting, 0)
        for setting in args.seed_settings.split(","):
            runs = [trained(setting, int(seed)) for seed in args.seeds.split(",")]
            seeds[setting] = {key: {"mean": statistics.mean(r[key] for r in runs), "std": statistics.stdev(r[key] for r in runs)
                                    if len(runs) > 1 else 0.0, "values": [r[key] for r in runs]} for key in ("kl", "rouge_l")}

    # 3. Step time: SFT vs KD from the cache vs KD with the live teacher, interleaved, same batches.
    timing_cfg = config(args.timing_setting)
    train_examples, _, _ = load_splits(timing_cfg.data, timing_cfg.train.seed)
    fill_teacher_responses(timing_cfg, teacher, tokenizer, train_examples, "train")
    train_items, _ = tokenize_examples(train_examples, tokenizer, max_prompt_length=timing_cfg.data.max_prompt_length,
                                       max_length=timing_cfg.data.max_length, system_prompt=timing_cfg.data.system_prompt)
    batch_size = timing_cfg.train.batch_size
    batches = [collate(train_items[i:i + batch_size], tokenizer.pad_token_id)
               for i in range(0, batch_size * (args.timing_steps + 1), batch_size)]
    cache = TeacherCache(timing_cfg.cache.dir)
    sft_cfg = validate(Config(objective=type(timing_cfg.objective)(name="sft")))
    variants = {
        "sft": make_objective(sft_cfg.objective, None, vocab),
        "kd_cached": make_objective(timing_cfg.objective, None, vocab, cache=cache),
        "kd_live": make_objective(timing_cfg.objective, teacher, vocab),
    }
    student = DecoderOnly(models.student).train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)
    times: dict[str, list[float]] = {name: [] for name in variants}

    def step(objective, batch) -> float:
        t0 = time.perf_counter()
        out = objective(student, batch)
        (out.loss_sum / max(int((batch["labels"][:, 1:] != -100).sum()), 1)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    for index, batch in enumerate(batches):
        order = list(variants) if index % 2 == 0 else list(reversed(variants))
        for name in order:
            seconds = step(variants[name], batch)
            if index > 0:  # the first step of each is warm-up
                times[name].append(seconds)
    step_times = {name: statistics.median(values) for name, values in times.items()}
    print("step times", json.dumps(step_times), flush=True)

    result = {
        "command": "python benchmarks/teacher_cache.py " + " ".join(sys.argv[1:]),
        "args": vars(args), "caches": caches, "quality": rows, "seeds": seeds,
        "step_seconds": step_times, "step_ratio_vs_sft": {k: v / step_times["sft"] for k, v in step_times.items()},
        "wall_seconds": time.time() - started, "torch": torch.__version__,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    write_markdown(result, out.with_suffix(".md"))
    print(out.with_suffix(".md").read_text())


def write_markdown(result: dict, path: Path) -> None:
    args, caches, rows = result["args"], result["caches"], result["quality"]
    lines = [
        "Demo setup (SmolLM2-135M-Instruct teacher, 9-layer pruned student, built-in prompts with the teacher's "
        "responses, batch 8, float32, 2-core CPU). Command: `" + result["command"] + "`.",
        "",
        "| teacher signal | bytes / token on disk | caching (teacher tokens/s) | held-out KL ↓ | vs dense | ROUGE-L ↑ | vs dense |",
        "|---|---|---|---|---|---|---|",
    ]
    dense = rows.get("dense")
    for name in ["untrained student", "dense", *args["settings"].split(",")]:
        if name not in rows and name not in caches:
            continue
        c = caches.get(name, {})
        q = rows.get(name, {})
        label = {"dense": "live teacher, dense (no cache)", "untrained student": "untrained pruned student"}.get(name, name)
        rel = lambda key: f"{100 * (q[key] / dense[key] - 1):+.1f}%" if q and dense and name != "dense" else ""  # noqa: E731
        lines.append(
            f"| {label} | {c.get('bytes_per_token', float('nan')):.1f} | {c.get('tokens_per_s', float('nan')):.0f} | "
            f"{q.get('kl', float('nan')):.3f} | {rel('kl')} | {q.get('rouge_l', float('nan')):.2f} | {rel('rouge_l')} |"
            if c else
            f"| {label} | – | – | {q.get('kl', float('nan')):.3f} | {rel('kl')} | {q.get('rouge_l', float('nan')):.2f} | {rel('rouge_l')} |"
        )
    if result.get("seeds"):
        lines += [
            "",
            f"Seed spread (training seeds {args['seeds']}; a sampled cache is redrawn per seed): mean ± std",
            "",
            "| teacher signal | held-out KL | vs dense | ROUGE-L | vs dense |",
            "|---|---|---|---|---|",
        ]
        base = result["seeds"].get("dense")
        for name, stats in result["seeds"].items():
            rel = {key: f"{100 * (stats[key]['mean'] / base[key]['mean'] - 1):+.1f}%" if base and name != "dense" else ""
                   for key in ("kl", "rouge_l")}
            lines.append(f"| {name} | {stats['kl']['mean']:.3f} ± {stats['kl']['std']:.3f} | {rel['kl']} | "
                         f"{stats['rouge_l']['mean']:.2f} ± {stats['rouge_l']['std']:.2f} | {rel['rouge_l']} |")
    s = result["step_seconds"]
    ratio = result["step_ratio_vs_sft"]
    lines += [
        "",
        f"Step time (forward, loss, backward, AdamW; median of {args['timing_steps']} interleaved steps, batch 8):",
        "",
        "| step | seconds | × SFT step |",
        "|---|---|---|",
        f"| SFT (no teacher) | {s['sft']:.3f} | 1.00 |",
        f"| KD from the cache ({args['timing_setting']}) | {s['kd_cached']:.3f} | {ratio['kd_cached']:.2f} |",
        f"| KD with the live teacher | {s['kd_live']:.3f} | {ratio['kd_live']:.2f} |",
    ]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
