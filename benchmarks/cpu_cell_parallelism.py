"""Two comparison cells at once, one thread each, against one after the other with both threads (issue 20's cost).

A cell of ``benchmarks/compare.py`` is a KD training run then its evaluation (greedy and sampled generation). On a
2-core CPU, torch's intra-op threads help the training's large matrix products but little the generation's small
decode steps (batch 16, one token per forward, Python between forwards). So two cells side by side, one thread each,
may finish sooner than the same two cells one after the other with two threads. This measures it on the comparison's
own models (the fine-tuned teacher and the 15-layer SFT start, from ``$KDLM_CACHE/bench``) and workload:

* **train**: ``--steps`` KD steps: the teacher's forward (no grad) and the student's forward + backward + AdamW on a
  batch of ``--batch-size`` rows of ``--length`` tokens, the logits of both models (the plain path, no fusion).
* **generate**: greedy generation of ``--gen-tokens`` tokens for ``--prompts`` t0mix test prompts, batch 16
  (:func:`kdlm.generation.generate`, what the evaluation runs).

Modes, timed on the wall clock from the work's start (after loading) to its end: ``sequential`` = the workload
twice in one process with 2 threads; ``parallel`` = the workload once in each of two processes started together,
1 thread each. The ratio parallel / sequential is what running two cells at once saves. Run on a quiet machine::

    .venv/bin/python benchmarks/cpu_cell_parallelism.py   # -> benchmarks/results/cpu_cell_parallelism.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def _models(cache: Path):
    from kdlm.models import load_model, load_tokenizer

    teacher_dir = next(cache.glob("teacher_ft-*"))
    student_dir = next(cache.glob("sft_start15-*"))
    teacher = load_model(str(teacher_dir)).eval().requires_grad_(False)
    student = load_model(str(student_dir)).train()
    return teacher, student, load_tokenizer(str(teacher_dir))


def _prompts(data: Path, tokenizer, count: int) -> list[str]:
    from kdlm.data import render_prompt

    prompts = []
    for line in (data / "test.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        prompt = render_prompt(tokenizer, [{"role": "user", "content": record["prompt"]}])
        if len(tokenizer(prompt)["input_ids"]) <= 192:
            prompts.append(prompt)
        if len(prompts) == count:
            break
    return prompts


def workload(args: argparse.Namespace, threads: int, repeats: int, barrier=None) -> dict[str, float]:
    """The train and generate phases ``repeats`` times with ``threads`` intra-op threads, after loading (and after
    ``barrier``, so that parallel processes start their work together): seconds per phase, and the work's start and
    end on the wall clock."""
    from kdlm.generation import generate

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    teacher, student, tokenizer = _models(Path(args.cache))
    prompts = _prompts(Path(args.data), tokenizer, args.prompts)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)
    vocab = student.config.vocab_size
    seconds = {"train": 0.0, "generate": 0.0}
    ids = torch.randint(3, vocab, (args.batch_size, args.length))
    student(input_ids=ids).logits.sum().backward()  # warm-up (allocator, kernels), not timed
    student.zero_grad(set_to_none=True)
    if barrier is not None:
        barrier.wait()
    seconds["start"] = time.time()
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(args.steps):
            ids = torch.randint(3, vocab, (args.batch_size, args.length))
            with torch.no_grad():
                target = torch.log_softmax(teacher(input_ids=ids).logits, -1)
            log_q = torch.log_softmax(student(input_ids=ids).logits, -1)
            loss = (target.exp() * (target - log_q)).sum(-1).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        t1 = time.perf_counter()
        student.eval()
        generate(student, tokenizer, prompts, max_new_tokens=args.gen_tokens, batch_size=16, progress=False)
        student.train()
        seconds["train"] += t1 - t0
        seconds["generate"] += time.perf_counter() - t1
    seconds["end"] = time.time()
    return seconds


def _child(args: argparse.Namespace, queue, barrier) -> None:
    queue.put(workload(args, threads=1, repeats=1, barrier=barrier))


def main(argv: list[str] | None = None) -> int:
    from kdlm.models import cache_root

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", default=str(cache_root() / "bench"), help="where compare.py cached its models")
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "t0mix"))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--length", type=int, default=200)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--gen-tokens", type=int, default=48)
    parser.add_argument("--out", default=str(RESULTS / "cpu_cell_parallelism.json"))
    args = parser.parse_args(argv)

    sequential = workload(args, threads=2, repeats=2)
    sequential_wall = sequential["end"] - sequential["start"]

    context = mp.get_context("spawn")
    queue, barrier = context.Queue(), context.Barrier(2)
    children = [context.Process(target=_child, args=(args, queue, barrier)) for _ in range(2)]
    for child in children:
        child.start()
    parallel = [queue.get() for _ in children]
    for child in children:
        child.join()
    parallel_wall = max(p["end"] for p in parallel) - min(p["start"] for p in parallel)

    result = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "settings": {k: v for k, v in vars(args).items() if k not in ("cache", "data", "out")},
        "cpu_threads_available": torch.get_num_threads(),
        "sequential_2_threads": {"wall_s": sequential_wall, "train_s": sequential["train"],
                                 "generate_s": sequential["generate"]},
        "parallel_2x1_thread": {"wall_s": parallel_wall,
                                **{f"{k}_s_per_process": [p[k] for p in parallel] for k in ("train", "generate")}},
        "parallel_over_sequential": parallel_wall / sequential_wall,
        "note": "wall_s: the work only (after loading; the two processes start it together), two workloads each mode",
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
