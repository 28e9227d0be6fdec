"""Sampling throughput of the two engines (objective.sampling.engine hf | vllm) with the demo student.

Exact command (from the repository root, after `make install` and `make vllm`):

    PYTHONPATH=src .venv/bin/python benchmarks/vllm_sampling.py

Setup: the demo student (9 of SmolLM2-135M-Instruct's 30 layers, pruned as kdlm does, float32); the first
prompts of the built-in demo set in the chat template; 64 new tokens at temperature 0.9 (top-p 1, top-k 0), the
stop tokens of the run (a completion may stop early: tokens/s counts the kept completion tokens, stop included).
For 4, 16 and 32 prompts per call, each engine samples the same batch through the same function
(``rollout.sample_window`` with ``hf_engine`` / ``VLLMEngine.engine``; wall time of the call, ``--repeats`` runs,
median, after one warm-up call per engine). The vLLM server runs on the same two cores as everything else (its
start-up is reported, not counted). Weight push: the student's weights changed, written to /dev/shm and reloaded by
the server (``VLLMEngine.sync``), ``--pushes`` times, median. The load average before and after is recorded:
other sessions share this machine. Writes ``benchmarks/results/vllm_sampling_cpu.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch


def _one(model, batch: dict, seed: int, settings, engine):
    """One sampling call of ``batch`` (row r seeded by seed * 1000 + r): the new batch and the call's stats."""
    seeds = [seed * 1000 + r for r in range(batch["input_ids"].shape[0])]
    from kdlm.train.rollout import sample_window

    [out], stats = sample_window(model, [batch], [seeds], settings, engine=engine)
    return out, stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 16, 32], help="prompts per sampling call")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--pushes", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/vllm_sampling_cpu", help="output path without suffix")
    args = parser.parse_args()

    from kdlm.config import DEMO_DATA, DEMO_TEACHER, DataConfig
    from kdlm.data.sources import read_examples
    from kdlm.models import default_keep_layers, load_model, load_tokenizer, prune_from_teacher
    from kdlm.sampler import stop_token_ids
    from kdlm.train.rollout import SamplingSettings, hf_engine, sample_window
    from kdlm.train.vllm_engine import VLLMEngine

    load_before = os.getloadavg()
    teacher = load_model(DEMO_TEACHER)
    student = prune_from_teacher(teacher, default_keep_layers(teacher.config.num_hidden_layers, 9)).eval()
    del teacher
    tokenizer = load_tokenizer(DEMO_TEACHER)
    examples, _ = read_examples(DEMO_DATA, DataConfig(responses="teacher"))
    texts = [tokenizer.apply_chat_template(e.messages, add_generation_prompt=True, tokenize=False)
             for e in examples[: max(args.sizes)]]
    prompts = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    settings = SamplingSettings(max_new_tokens=args.new_tokens, temperature=0.9, top_p=1.0, top_k=0,
                                stop_token_ids=tuple(stop_token_ids(tokenizer, student)),
                                pad_token_id=tokenizer.pad_token_id)

    def batch_of(size: int) -> dict:
        rows = prompts[:size]
        width = max(map(len, rows))
        ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
        return {"input_ids": ids, "prompt_lengths": torch.tensor([len(r) for r in rows]),
                "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])}

    engine = VLLMEngine(max_model_len=1024)  # its log lives (and goes) with its temporary folder
    started = time.perf_counter()
    engine.sync(student, 0, tokenizer)
    startup = time.perf_counter() - started
    calls = {
        "hf": lambda batch, seed: _one(student, batch, seed, settings, hf_engine),
        "vllm": lambda batch, seed: _one(student, batch, seed, settings, engine.engine(version=0, tokenizer=tokenizer)),
    }
    rows = []
    try:
        for name, call in calls.items():
            call(batch_of(2), 0)  # warm-up
        for size in args.sizes:
            for name, call in calls.items():
                seconds, tokens = [], []
                for repeat in range(args.repeats):
                    begin = time.perf_counter()
                    _, stats = call(batch_of(size), 100 + repeat)
                    seconds.append(time.perf_counter() - begin)
                    tokens.append(stats.generated_tokens)
                median = statistics.median(seconds)
                rows.append({"engine": name, "prompts": size, "seconds": median,
                             "tokens": statistics.median(tokens),
                             "tokens_per_s": statistics.median(t / s for t, s in zip(tokens, seconds))})
                print(rows[-1], flush=True)
        push_seconds = []
        generator = torch.Generator().manual_seed(0)
        for version in range(1, args.pushes + 1):
            with torch.no_grad():
                for param in student.parameters():
                    param.add_(torch.randn(param.shape, generator=generator) * 1e-3)
            engine.sync(student, version, tokenizer)
            push_seconds.append(engine.push_seconds)
    finally:
        engine.close()
    result = {
        "rows": rows, "server_start_seconds": startup, "push_seconds": push_seconds,
        "push_seconds_median": statistics.median(push_seconds), "new_tokens": args.new_tokens,
        "repeats": args.repeats, "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "cpus": os.cpu_count(),
        "parameters": sum(p.numel() for p in student.parameters()),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


def markdown(result: dict) -> str:
    lines = ["| prompts per call | engine | seconds | kept tokens | tokens/s | vllm speed-up |", "|---|---|---|---|---|---|"]
    by = {(r["engine"], r["prompts"]): r for r in result["rows"]}
    for (engine, size), row in by.items():
        hf = by.get(("hf", size))
        speedup = f"{row['tokens_per_s'] / hf['tokens_per_s']:.2f}x" if engine == "vllm" and hf else ""
        lines.append(f"| {size} | {engine} | {row['seconds']:.2f} | {row['tokens']:.0f} | {row['tokens_per_s']:.0f} | "
                     f"{speedup} |")
    lines += [
        "",
        f"Weight push (write to /dev/shm + server reload), median of {len(result['push_seconds'])}: "
        f"{result['push_seconds_median']:.2f} s (all: {', '.join(f'{s:.2f}' for s in result['push_seconds'])}); "
        f"server start-up {result['server_start_seconds']:.0f} s (once per run).",
        f"Load average (1, 5, 15 min) before {tuple(round(v, 2) for v in result['load_average_before'])}, after "
        f"{tuple(round(v, 2) for v in result['load_average_after'])}, on {result['cpus']} CPUs; "
        f"{result['new_tokens']} new tokens, median of {result['repeats']} calls.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
