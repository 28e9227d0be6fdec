"""Fused distillation loss benchmark: generalized JSD (β = 0.5), forward + backward, float32, CPU.

Exact command (from the repository root; environment: benchmarks/requirements-bench.txt):

    .venv-bench/bin/python benchmarks/fused_loss.py

Options: ``--sizes 2048,8192`` ``--repeats 3`` ``--repeats-by-size 8192:1`` ``--out benchmarks/results/fused_loss_cpu``.

Shapes are SmolLM2's output layer: H = 576, V = 49152, N tokens, student and teacher with the same H
(the teacher's H does not change the loss-side costs). Every implementation runs in its own
subprocess, so its peak memory is that process's peak resident set size (``ru_maxrss`` from
``resource.getrusage``; no tracemalloc). The table reports the peak and the resident size just before
the loss call (inputs, weights, interpreter and libraries), so ``peak − before`` is the loss's own
footprint. Times are the median of ``--repeats`` steady-state runs of forward + backward; the first
(warm-up) run is reported separately (for ``torch.compile`` variants it includes compilation).

Implementations:
* ``matmul``: one N×H×V matmul (the floor is four: student and teacher forward, two for the backward).
* ``materialised``: plain torch, full N×V logits, ``kdlm.losses.distill_loss`` on them.
* ``kdlm`` / ``kdlm-compiled``: ``kdlm.losses.fused_distill_loss`` eager / with ``compile=True``.
* ``trl``: ``trl.trainer.distillation_trainer._chunked_divergence_loss`` (trl 1.16).
* ``liger``: ``liger_kernel.chunked_loss.LigerFusedLinearJSDLoss(compiled=False)`` with hard-loss
  weight 0 and soft-loss weight 1.
* ``kdlm[-compiled]:<divergence>``: kdlm's other divergences, same setting.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

H, V, BETA, SEED = 576, 49152, 0.5, 0

ROOT = Path(__file__).resolve().parents[1]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _inputs(n: int):
    import torch

    gen = torch.Generator().manual_seed(SEED)
    student_hidden = torch.randn(n, H, generator=gen)
    student_weight = torch.randn(V, H, generator=gen) * 0.05
    teacher_hidden = torch.randn(n, H, generator=gen)
    teacher_weight = torch.randn(V, H, generator=gen) * 0.05
    return student_hidden, student_weight, teacher_hidden, teacher_weight


def _make_step(impl: str, n: int):
    """Returns (inputs needing grad, step function returning the loss)."""
    import torch

    sh, sw, th, tw = _inputs(n)
    sh.requires_grad_(True)
    sw.requires_grad_(True)
    mask = torch.ones(n, dtype=torch.bool)

    if impl == "matmul":
        def step():
            with torch.no_grad():
                return (sh @ sw.T)[0, 0]
        return (), step
    if impl == "materialised":
        from kdlm.losses import distill_loss

        def step():
            student_logits = sh @ sw.T
            with torch.no_grad():
                teacher_logits = th @ tw.T
            return distill_loss(student_logits, teacher_logits, mask, "jsd", beta=BETA)
        return (sh, sw), step
    if impl.startswith("kdlm"):
        from kdlm.losses import DEFAULT_PARAMS, fused_distill_loss

        name, _, divergence = impl.partition(":")
        divergence = divergence or "jsd"
        params = {"beta": BETA} if divergence == "jsd" else dict(DEFAULT_PARAMS[divergence])
        compiled = name == "kdlm-compiled"

        def step():
            return fused_distill_loss(sh, sw, th, tw, mask, divergence, compile=compiled, **params)
        return (sh, sw), step
    if impl == "trl":
        from trl.trainer.distillation_trainer import _chunked_divergence_loss

        def step():
            loss, _entropy, _count = _chunked_divergence_loss(
                sh.unsqueeze(0), th.unsqueeze(0), sw, tw, mask.unsqueeze(0).long(), BETA
            )
            return loss
        return (sh, sw), step
    if impl == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        loss_fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=BETA, compiled=False)
        labels = torch.zeros(n, dtype=torch.long)

        def step():
            return loss_fn(sh, sw, th, tw, labels)
        return (sh, sw), step
    raise ValueError(impl)


def worker(impl: str, n: int, repeats: int) -> dict:
    import torch

    record: dict = {"impl": impl, "n": n, "threads": torch.get_num_threads()}
    try:
        params, step = _make_step(impl, n)
        record["rss_before_mb"] = round(_current_rss_mb(), 1)
        times = []
        for index in range(repeats + 1):
            for p in params:
                p.grad = None
            start = time.perf_counter()
            loss = step()
            if params:
                loss.backward()
            elapsed = time.perf_counter() - start
            if index == 0:
                record["warmup_s"] = round(elapsed, 3)
            else:
                times.append(elapsed)
        record["loss"] = float(loss.detach())
        record["times_s"] = [round(t, 3) for t in times]
        record["median_s"] = round(statistics.median(times), 3)
        record["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    except Exception as error:  # noqa: BLE001 - recorded in the table
        record["error"] = f"{type(error).__name__}: {error}"[:300]
    return record


def run_in_subprocess(impl: str, n: int, repeats: int, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, "--n", str(n), "--repeats", str(repeats)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"impl": impl, "n": n, "error": f"timed out after {timeout:.0f} s"}
    for line in reversed(out.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"impl": impl, "n": n, "error": f"exit {out.returncode}: {out.stderr[-300:]}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker")
    parser.add_argument("--n", type=int)
    parser.add_argument("--sizes", default="2048,8192")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--impls", default="matmul,materialised,kdlm,kdlm-compiled,trl,liger")
    parser.add_argument("--divergences", default="fkl,rkl,tvd,skew_fkl,skew_rkl,akl")
    parser.add_argument("--divergence-sizes", default="2048")
    parser.add_argument("--divergence-variants", default="kdlm")
    parser.add_argument("--repeats-by-size", default="8192:1", help="N:repeats overrides, comma-separated")
    parser.add_argument("--skip", default="materialised@8192",
                        help="impl@N pairs not run (materialised at N=8192 needs ~4x its N=2048 peak)")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fused_loss_cpu"))
    parser.add_argument("--merge", action="store_true",
                        help="re-measure only the given rows; keep the other rows of an existing --out .json")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.n, args.repeats)), flush=True)
        return

    skip = set(args.skip.split(",")) if args.skip else set()
    jobs = []
    for n in [int(x) for x in args.sizes.split(",")]:
        for impl in args.impls.split(","):
            jobs.append((impl, n))
        if str(n) in args.divergence_sizes.split(","):
            for divergence in args.divergences.split(","):
                for variant in args.divergence_variants.split(","):
                    if variant in args.impls.split(","):
                        jobs.append((f"{variant}:{divergence}", n))
    records = []
    if args.divergences == "":
        jobs = [(impl, n) for impl, n in jobs if ":" not in impl]
    for impl, n in jobs:
        if f"{impl}@{n}" in skip:
            records.append({"impl": impl, "n": n, "error": "not run (skipped: memory/time, see --skip)"})
            continue
        overrides = dict(item.split(":") for item in args.repeats_by_size.split(",") if item)
        record = run_in_subprocess(impl, n, int(overrides.get(str(n), args.repeats)), args.timeout)
        print(json.dumps(record), flush=True)
        records.append(record)
    import torch

    meta = {
        "command": " ".join([Path(sys.executable).name, "benchmarks/fused_loss.py"] + sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "shape": {"H": H, "V": V, "beta": BETA, "dtype": "float32"},
        "repeats": f"{args.repeats} (overrides N:repeats {args.repeats_by_size or 'none'})",
        "load_average_at_end": os.getloadavg(),
    }
    if args.merge and Path(args.out + ".json").is_file():
        fresh = {(r["impl"], r["n"]) for r in records}
        previous = json.loads(Path(args.out + ".json").read_text())
        kept = [r for r in previous["records"] if (r["impl"], r["n"]) not in fresh]
        records = sorted(kept + records, key=lambda r: (r["n"], _order(r["impl"])))
        meta["command"] = previous["meta"]["command"] + f"; then {meta['command']} (merged)"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps({"meta": meta, "records": records}, indent=1) + "\n")
    Path(args.out + ".md").write_text(render(meta, records))
    print(render(meta, records))


def _order(impl: str) -> tuple[int, str]:
    names = ["matmul", "materialised", "kdlm", "kdlm-compiled", "trl", "liger"]
    return (names.index(impl), "") if impl in names else (len(names), impl)


def render(meta: dict, records: list[dict]) -> str:
    lines = [
        "# Fused distillation loss, CPU (generated by benchmarks/fused_loss.py)",
        "",
        f"Command: `{meta['command']}`; torch {meta['torch']}; {meta['machine']}; H={meta['shape']['H']}, "
        f"V={meta['shape']['V']}, generalized JSD β={meta['shape']['beta']}, float32, forward + backward. "
        f"Times: median of {meta['repeats']} steady-state runs; warm-up = first run (includes torch.compile "
        "compilation for the compiled variant). Memory: peak resident set size of the implementation's own "
        "process (ru_maxrss), and the resident size before the loss call (inputs + libraries). "
        f"Load average at the end: {', '.join(f'{x:.1f}' for x in meta['load_average_at_end'])} "
        "(the 2-core machine is shared, timings are noisy).",
        "",
    ]
    for n in sorted({r["n"] for r in records}):
        rows = [r for r in records if r["n"] == n]
        floor = next((4 * r["median_s"] for r in rows if r["impl"] == "matmul" and "median_s" in r), None)
        jsd_time = {r["impl"]: r["median_s"] for r in rows if r["impl"] in ("kdlm", "kdlm-compiled") and "median_s" in r}
        lines += [f"## N = {n}", ""]
        if floor:
            lines.append(f"Four-matmul floor: {floor:.2f} s.")
            lines.append("")
        lines += ["| implementation | loss | median s | × floor | warm-up s | peak RSS MB | RSS before MB | note |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['impl']} | | | | | | | {r['error']} |")
                continue
            note = ""
            variant, _, divergence = r["impl"].partition(":")
            if divergence and variant in jsd_time:
                note = f"{r['median_s'] / jsd_time[variant]:.2f}× kdlm's JSD"
            ratio = f"{r['median_s'] / floor:.2f}" if floor and r["impl"] != "matmul" else ""
            lines.append(
                f"| {r['impl']} | {r['loss']:.6f} | {r['median_s']:.2f} | {ratio} | {r['warmup_s']:.2f} | "
                f"{r['peak_rss_mb']:.0f} | {r['rss_before_mb']:.0f} | {note} |"
            )
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
