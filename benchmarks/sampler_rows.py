"""Cost of kdlm's per-row seeded sampler (kdlm.sampler.sample_rows, used by GKD's rollouts) against transformers'
own sampling (kdlm.sampler.sample_tokens), and of batching more prompts into one call, on the demo student.

Demo student (SmolLM2-135M-Instruct pruned to 9 layers), float32, the first demo prompts, 64 new tokens at
temperature 0.9 (stopping disabled so that every call decodes exactly 64 steps). The variants alternate, so the
machine's load hits them alike. Command (from the repository root):

    PYTHONPATH=src .venv/bin/python benchmarks/sampler_rows.py --repeats 2

Writes ``benchmarks/results/sampler_rows_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/sampler_rows_cpu.json")
    args = parser.parse_args()

    from kdlm.config import Config
    from kdlm.data import read_examples
    from kdlm.data.format import encode_prompt, render_prompt
    from kdlm.models import load_models
    from kdlm.sampler import left_pad, sample_rows, sample_tokens

    cfg = Config()
    models = load_models(cfg)
    student, tokenizer = models.student.eval(), models.tokenizer
    examples, _ = read_examples(cfg.data.train, cfg.data)
    prompts = [encode_prompt(tokenizer, render_prompt(tokenizer, e.messages, cfg.data.system_prompt))
               for e in examples[:32]]

    def batch(n):
        lengths = torch.tensor([len(p) for p in prompts[:n]])
        ids = torch.full((n, int(lengths.max())), tokenizer.pad_token_id)
        for row, p in enumerate(prompts[:n]):
            ids[row, : len(p)] = torch.tensor(p)
        return left_pad(ids, lengths, tokenizer.pad_token_id)

    never = [len(tokenizer) + 10]  # no stop token: every call decodes all 64 steps
    common = dict(max_new_tokens=64, stop_token_ids=never, pad_token_id=tokenizer.pad_token_id, temperature=0.9)
    variants = {
        "transformers sampling, 4 prompts": lambda: sample_tokens(student, *batch(4), seed=0, **common),
        "per-row sampler, 4 prompts": lambda: sample_rows(student, *batch(4), row_seeds=range(4), **common),
        "transformers sampling, 16 prompts": lambda: sample_tokens(student, *batch(16), seed=0, **common),
        "per-row sampler, 16 prompts": lambda: sample_rows(student, *batch(16), row_seeds=range(16), **common),
        "per-row sampler, 32 prompts": lambda: sample_rows(student, *batch(32), row_seeds=range(32), **common),
    }
    variants["per-row sampler, 4 prompts"]()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, run in variants.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
            print(name, times[name][-1], flush=True)
    medians = {name: statistics.median(v) for name, v in times.items()}
    result = {"command": f"PYTHONPATH=src .venv/bin/python benchmarks/sampler_rows.py --repeats {args.repeats}",
              "loadavg_end": os.getloadavg(), "torch_threads": torch.get_num_threads(), "seconds": times,
              "median_s": medians,
              "per_row_over_transformers_4": medians["per-row sampler, 4 prompts"] / medians["transformers sampling, 4 prompts"],
              "per_row_over_transformers_16": medians["per-row sampler, 16 prompts"] / medians["transformers sampling, 16 prompts"],
              "per_row_cost_per_4_prompts_s": {n: medians[f"per-row sampler, {n} prompts"] * 4 / n for n in (4, 16, 32)}}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
