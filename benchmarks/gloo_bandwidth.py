"""What FSDP2's collectives cost on this CPU: gloo all-gather and reduce-scatter between 2 processes, GB/s.

Why: under ``train.parallel fsdp`` every micro-batch all-gathers the teacher (once) and the student (forward, and
again in the backward unless ``train.fsdp_reshard_after_forward false``) and reduce-scatters the student's
gradients; ``benchmarks/sharded.py`` measures the step, this script the transport that the step's extra time is
spent in. Each process runs ``all_gather_into_tensor`` and ``reduce_scatter_tensor`` (the calls FSDP2 makes) on
float32 buffers of ``--mb`` MB of output per call, ``--repeats`` times after one warm-up, one thread per process
(as the benchmark's runs). Exact command (from the repository root):

    .venv/bin/python benchmarks/gloo_bandwidth.py

Writes ``benchmarks/results/gloo_bandwidth_cpu.{json,md}``: seconds per call and the rate in GB of gathered output
(all-gather) or of reduced input (reduce-scatter) per second and process, plus what that predicts for the demo's
fsdp step (bytes per micro-batch from the models' sizes, ``--teacher-gb``/``--student-gb``).
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
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    numel = int(args.mb * 1024 ** 2 / 4)
    full = torch.randn(numel)
    shard = torch.randn(numel // world)
    times: dict[str, list[float]] = {"all_gather": [], "reduce_scatter": []}
    for repeat in range(args.repeats + 1):
        for name in times:
            dist.barrier()
            start = time.perf_counter()
            if name == "all_gather":
                dist.all_gather_into_tensor(full, shard)
            else:
                dist.reduce_scatter_tensor(shard, full)
            if repeat:  # the first round is a warm-up
                times[name].append(time.perf_counter() - start)
    if rank == 0:
        Path(args.out).write_text(json.dumps({k: statistics.median(v) for k, v in times.items()}))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=256, help="MB of gathered output (reduce-scatter input) per call")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--teacher-gb", type=float, default=0.501, help="full teacher parameters (demo: 0.501 GB)")
    parser.add_argument("--student-gb", type=float, default=0.224, help="full student parameters (demo: 0.224 GB)")
    parser.add_argument("--embedding-gb", type=float, default=0.113,
                        help="the tied embedding, gathered a second time as the teacher's output layer")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    out = Path("/tmp") / f"kdlm-gloo-{os.getpid()}.json"
    load_before = os.getloadavg()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(random.randint(20000, 40000)), __file__, "--worker", "--out", str(out), "--mb", str(args.mb),
               "--repeats", str(args.repeats)]
    subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True, capture_output=True, timeout=600)
    seconds = json.loads(out.read_text())
    out.unlink()
    gb = args.mb / 1024
    rate = {name: gb / s for name, s in seconds.items()}
    # Per micro-batch under fsdp (demo, fkl, tied embeddings): the teacher gathered once plus its output layer
    # again; the student gathered in the forward and again in the backward (the root's embedding stays gathered);
    # the student's gradients reduce-scattered once.
    gathered = args.teacher_gb + args.embedding_gb + args.student_gb + (args.student_gb - args.embedding_gb)
    predicted = gathered / rate["all_gather"] + args.student_gb / rate["reduce_scatter"]
    # ddp's all-reduce of the gradients moves what one reduce-scatter and one all-gather of them move.
    ddp = args.student_gb / rate["reduce_scatter"] + args.student_gb / rate["all_gather"]
    result = {"setup": {"mb_per_call": args.mb, "repeats": args.repeats, "processes": 2, "threads_per_process": 1,
                        "load_average_before": load_before, "load_average_after": os.getloadavg()},
              "seconds_per_call": seconds, "gb_per_s": rate,
              "fsdp_micro_batch": {"gathered_gb": gathered, "reduce_scattered_gb": args.student_gb,
                                   "predicted_collective_s": predicted},
              "ddp_micro_batch": {"all_reduced_gb": args.student_gb, "predicted_collective_s": ddp}}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gloo_bandwidth_cpu.json").write_text(json.dumps(result, indent=1))
    lines = [
        "# gloo collectives between 2 processes on this CPU (what fsdp's extra step time is spent in)",
        "",
        f"Command: `.venv/bin/python benchmarks/gloo_bandwidth.py` ({args.mb:g} MB float32 output per call, median of "
        f"{args.repeats} after a warm-up, one thread per process; load average {load_before[0]:.2f} before).",
        "",
        "| collective | s per call | GB/s per process |",
        "|---|---|---|",
        f"| all_gather_into_tensor | {seconds['all_gather']:.3f} | {rate['all_gather']:.2f} |",
        f"| reduce_scatter_tensor | {seconds['reduce_scatter']:.3f} | {rate['reduce_scatter']:.2f} |",
        "",
        f"Per fsdp micro-batch of the demo the processes gather {gathered:.3f} GB (teacher once, its tied output layer "
        f"again, the student in the forward and its layers again in the backward) and reduce-scatter "
        f"{args.student_gb:.3f} GB of gradients: **{predicted:.2f} s of collectives per micro-batch** at these rates, "
        f"against {ddp:.2f} s for ddp's one all-reduce of the gradients: **{predicted - ddp:.2f} s more per "
        "micro-batch under fsdp** from the transport alone (the copies into and out of the collectives' buffers "
        "come on top).",
        "",
    ]
    (RESULTS / "gloo_bandwidth_cpu.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
