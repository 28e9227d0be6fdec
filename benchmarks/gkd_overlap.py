"""Does sampling the next window in a background thread pay on this CPU? (issue 19, item 3)

GKD with ``sampling.steps_per_generation`` = k samples 4k prompts in one call, then trains k steps on them. An
overlapped loop would sample window w + 1 (from a snapshot of the student's weights, one window staler) in a second
thread while window w trains. This script times both schedules on the demo models (teacher SmolLM2-135M-Instruct,
9-layer pruned student, batch 4, 64 new tokens at temperature 0.9, generalized JSD), float32:

* sequential: sample(4k prompts) then k training steps (kdlm's gkd objective: loss forward, backward, AdamW);
* overlapped: the same sampling call in a thread (on a deep copy of the student) while the k steps run.

Both schedules alternate, ``--repeats`` times each, so machine load hits them alike; the figure is the median
ratio overlapped / sequential of back-to-back pairs. Command (from the repository root):

    PYTHONPATH=src .venv/bin/python benchmarks/gkd_overlap.py --k 4 --repeats 3

Writes ``benchmarks/results/gkd_overlap_cpu.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import threading
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/gkd_overlap_cpu.json")
    args = parser.parse_args()

    from kdlm.config import Config, validate
    from kdlm.data import collate, load_splits, tokenize_examples
    from kdlm.generation import fill_teacher_responses
    from kdlm.models import DecoderOnly, load_models
    from kdlm.train.objectives import make_objective

    cfg = Config()
    cfg.train.batch_size = 4
    o = cfg.objective
    o.name, o.divergence, o.beta, o.kd_ratio, o.lmbda = "gkd", "jsd", 0.5, 1.0, 1.0
    o.sampling.temperature, o.sampling.max_new_tokens, o.sampling.steps_per_generation = 0.9, 64, args.k
    cfg = validate(cfg)
    models = load_models(cfg)
    train_examples, _, has_responses = load_splits(cfg.data, cfg.train.seed)
    if not has_responses:  # tokenisation wants a response; the teacher's are cached on disk (only prompts are used)
        fill_teacher_responses(cfg, models.teacher, models.tokenizer, train_examples, "train")
    items, _ = tokenize_examples(train_examples, models.tokenizer, max_prompt_length=cfg.data.max_prompt_length,
                                 max_length=cfg.data.max_length, system_prompt=cfg.data.system_prompt)
    objective = make_objective(cfg.objective, models.teacher, models.vocab_size, tokenizer=models.tokenizer,
                               max_length=cfg.data.max_length, seed=0)
    student_lm = models.student.train()
    student = DecoderOnly(student_lm)
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.train.lr)
    windows = [{s: [collate(items[(4 * (w * args.k + s)) % len(items):][:4], models.tokenizer.pad_token_id)]
                for s in range(args.k)} for w in range(2)]

    def sample(model, window):
        return objective.sampler.sample_steps(model, window, who="student", process_index=0, now=min(window))[0]

    def train(sampled):
        for s in sorted(sampled):
            for batch in sampled[s]:
                out = objective(student, batch)
                (out.loss_sum / max(objective.units(batch), 1)).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    sampled = sample(student_lm, windows[0])  # warm-up, and the window the timed training uses
    train(sampled)
    pairs = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        sample(student_lm, windows[1])
        train(sampled)
        sequential = time.perf_counter() - t0

        t0 = time.perf_counter()
        snapshot = copy.deepcopy(student_lm)  # the sampler must not read weights the optimizer is changing
        thread = threading.Thread(target=sample, args=(snapshot, windows[1]))
        thread.start()
        train(sampled)
        thread.join()
        overlapped = time.perf_counter() - t0
        pairs.append({"sequential_s": sequential, "overlapped_s": overlapped, "ratio": overlapped / sequential})
        print(pairs[-1], flush=True)
    result = {"command": f"PYTHONPATH=src .venv/bin/python benchmarks/gkd_overlap.py --k {args.k} --repeats {args.repeats}",
              "k": args.k, "torch_threads": torch.get_num_threads(), "logical_cpus": os.cpu_count(),
              "loadavg": os.getloadavg(), "pairs": pairs,
              "median_ratio_overlapped_to_sequential": statistics.median(p["ratio"] for p in pairs)}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
