"""Method comparison that can rank methods (issue 20): every method continues from one SFT student, ≥ 3 seeds,
intervals, and each seed paper's claim checked. Reuses ``benchmarks/methods.py``'s pieces (data subset, cached
teacher fine-tuning, evaluator, recipe overrides).

Protocol (the seed papers' own — MiniLLM, DistiLLM, GKD start every distillation run from the SFT student and give
each method the same further budget — scaled to this machine):

1. **Teacher**: the demo teacher fine-tuned on t0mix train (plain SFT, cached; ``methods.ensure_teacher``).
2. **SFT start**: a student of ``--student-layers`` layers pruned from the fine-tuned teacher, warm-started with
   ``--sft-steps`` steps of plain SFT on t0mix train; computed once and cached in ``$KDLM_CACHE/bench/sft_start-<hash>``
   (the hash covers every setting). Its size is chosen so that it is clearly better than noise and clearly below
   the teacher (``--candidates 9,15,20`` measures the choices; see the README).
3. **Every method row continues from that SFT student** with the same budget (``--steps`` × ``--batch-size``, lr
   ``--lr``, the recipe's schedule, the same data and sequence limits): SFT (continued), FKL, RKL, JSD, TVD, skew
   FKL, AKL, FKL + ranking and AKL + ranking (RLKD), GKD λ 0.5 and λ 1 (with issue 19's faster sampling,
   ``steps_per_generation`` 4: one sampling call per 4 steps, samples at most 3 steps old), DPKD token and
   sequence forms (the sequence form's chosen response is the dataset's: the teacher was fine-tuned to write it,
   and generating 12,660 teacher responses does not fit a CPU budget), DDK and the same loss with natural mixing (``ddk_natural``).
4. **Seeds**: every row × every ``--seeds`` training seed is one *cell*, stored in
   ``<out>_cells/<settings hash>/<row>-seed<k>.json`` when done (per-example scores and aggregates) and skipped by
   a rerun; ``--rows`` picks rows, ``--time-budget-min`` stops cleanly before a cell that would not finish in time
   (so the matrix runs in session-sized pieces). A piece claims a cell before training it (:func:`claim_cell`), so
   pieces running side by side share the same rows out cell by cell. The teacher's and the SFT start's evaluations
   are cells too.
5. **Evaluation** on t0mix test, all nine domains, the first ``--per-domain`` examples of each whose prompt fits:
   greedy decoding and the MiniLLM sampling protocol (τ 1, top-k 0, top-p 1, one sample per ``--sample-seeds`` seed,
   scores averaged over them), ROUGE-L and exact match ×100 (kdlm eval's metrics), and the held-out per-token
   KL(fine-tuned teacher ‖ model) on the references, per example and per domain. The teacher's hidden states on
   the test set are computed once and kept in the work folder for every later cell and invocation. The sampled
   generations draw one random stream per evaluation batch, so a cells folder records its ``--eval-batch-size``
   (``shared.json``) and an invocation asking for another one stops before any work (:func:`check_evaluation`).
6. **Statistics** (:mod:`kdlm.report.stats`): per row mean ± 95 % t-interval over seeds; paired differences against
   SFT and against FKL with a bootstrap over seeds and examples (domain-stratified, same draws for both rows);
   gap closed = (method − SFT) / (teacher − SFT); the claims table (:mod:`kdlm.report.claims`).

Outputs: ``<out>.json`` (settings, per-row statistics, claims), ``<out>.md`` (the tables), ``<out>_cells/``,
``<out>_report/`` (``kdlm report`` of the cells' run directories, seeds grouped with intervals). Scales: ``cpu``
(the committed table; a cell takes 8–10 min alone on the 2-core reference CPU, so every row × 3 seeds is about 7 h,
run in pieces; two pieces side by side with one thread each, ``OMP_NUM_THREADS=1``, finish a pair of cells in
0.81× the time of one after the other, measured by ``benchmarks/cpu_cell_parallelism.py``; a last invocation with ``--time-budget-min 0`` writes the tables from every stored cell), ``gpu`` (same protocol,
larger budget, bf16 autocast, 5 sampling seeds; one prepared call on a lent GPU), ``smoke`` (tiny budget, rows
``sft,fkl``, seeds ``0,1``: checks the whole pipeline in minutes; the slow test runs it on tiny models)::

    nice -n 10 .venv/bin/python benchmarks/compare.py --rows sft,fkl --time-budget-min 50   # one piece
    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/compare.py --time-budget-min 50 &  # two at once:
    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/compare.py --time-budget-min 50    # they share cells
    nice -n 10 .venv/bin/python benchmarks/compare.py --candidates 9,15,20                   # student choice
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # methods.py beside this file

import methods  # noqa: E402
from methods import (  # noqa: E402
    DOMAIN_SHORT, ROOT, Evaluator, add_budget_flags, as_command, common_overrides, ensure_teacher, file_id, fingerprint,
    recipe_flags, step_seconds, train_cached, write_subset,
)

from kdlm.cli import parse_config  # noqa: E402
from kdlm.config import DEMO_TEACHER  # noqa: E402
from kdlm.models import load_tokenizer  # noqa: E402
from kdlm.report.claims import CLAIMS, check_claims, claims_markdown, on_metric  # noqa: E402
from kdlm.report.stats import Interval, gap_closed, paired_difference, t_interval  # noqa: E402
from kdlm.train.loop import distill  # noqa: E402

# Method rows: name -> (recipe in configs/, extra overrides). Order = the table's order.
ROWS: dict[str, tuple[str, list[str]]] = {
    "sft": ("sft", []), "fkl": ("fkl", []), "rkl": ("rkl", []), "jsd": ("jsd", []), "tvd": ("tvd", []),
    "skew_fkl": ("skew_fkl", []), "akl": ("akl", []), "fkl_rlkd": ("rlkd", []), "akl_rlkd": ("akl_rlkd", []),
    # GKD with the landed faster sampling (issue 19), as issue 20 asks: one sampling call per 4 steps
    "gkd_lambda0.5": ("gkd", [*methods.METHODS["gkd_lambda0.5"][1], "--objective.sampling.steps_per_generation", "4"]),
    "gkd_lambda1": ("gkd", [*methods.METHODS["gkd_lambda1"][1], "--objective.sampling.steps_per_generation", "4"]),
    "dpkd": ("dpkd", []), "dpkd_sequence": ("dpkd_sequence", []), "ddk": ("ddk", []),
    "ddk_natural": ("ddk", ["--data.mixing.strategy", "none"]),
}
BASE = ("teacher_ft", "sft_start")
LABELS = {
    **{k: v for k, v in methods.LABELS.items() if k in ROWS or k == "teacher_ft"},
    "sft_start": "SFT start (the student every row continues from)",
    "gkd_lambda0.5": "GKD λ 0.5 (`gkd.yaml`, steps_per_generation 4)",
    "gkd_lambda1": "GKD λ 1, on-policy (`gkd.yaml`, steps_per_generation 4)",
    "sft": "SFT, continued (`sft.yaml`)",
    "fkl_rlkd": "FKL + ranking (`rlkd.yaml`)",
    "dpkd_sequence": "DPKD sequence form (`dpkd_sequence.yaml`)",
    "ddk": "DDK mixing, CE + 0.2·KL (`ddk.yaml`)",
    "ddk_natural": "natural mixing, CE + 0.2·KL (`ddk.yaml`, mixing none)",
}
SCALES = {
    # Defaults per scale; any flag given on the command line wins. lr: the continuation's (the SFT start is trained).
    "smoke": dict(student_layers=4, sft_steps=2, sft_lr=3e-4, steps=2, batch_size=2, lr=1e-4, teacher_steps=2,
                  teacher_batch_size=2, teacher_lr=1e-4, per_domain=1, max_prompt_length=128, max_length=160,
                  gen_tokens=8, gkd_new_tokens=8, ddk_val_per_domain=2, eval_batch_size=9, sample_seeds="10,20",
                  seeds="0,1", rows="sft,fkl"),
    "cpu": dict(student_layers=15, sft_steps=120, sft_lr=3e-4, steps=40, batch_size=8, lr=1e-4, teacher_steps=80,
                teacher_batch_size=8, teacher_lr=1e-4, per_domain=10, max_prompt_length=192, max_length=256,
                gen_tokens=48, gkd_new_tokens=48, ddk_val_per_domain=16, eval_batch_size=16,
                sample_seeds="10,20,30", seeds="0,1,2", rows=",".join(ROWS)),
    "gpu": dict(student_layers=15, sft_steps=1000, sft_lr=3e-4, steps=1000, batch_size=16, lr=1e-4,
                teacher_steps=2000, teacher_batch_size=16, teacher_lr=5e-5, per_domain=100, max_prompt_length=384,
                max_length=512, gen_tokens=128, gkd_new_tokens=128, ddk_val_per_domain=64, eval_batch_size=64,
                sample_seeds="10,20,30,40,50", seeds="0,1,2", rows=",".join(ROWS)),
}
SHARED_RECORD = "shared.json"  # beside the cells: what they were scored against (check_shared, check_evaluation)
# The scores kept per test example of every cell (the statistics' input). ROUGE-L / EM ×100; kl in nats/token.
SCORES = ("rouge_l_sample", "exact_match_sample", "rouge_l_greedy", "exact_match_greedy", "kl")
METRIC_NAMES = {"rouge_l_sample": "ROUGE-L (sampled)", "rouge_l_greedy": "ROUGE-L (greedy)",
                "exact_match_sample": "EM (sampled)", "exact_match_greedy": "EM (greedy)",
                "kl": "held-out KL (lower is better)"}
# The claims' comparisons judged again on these (metric, higher is better) beside the papers' own metric.
SECONDARY_METRICS = (("rouge_l_greedy", True), ("kl", False))


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    parser.add_argument("--rows", help="comma-separated method rows (default: all of the scale's); known: "
                                       + ",".join(ROWS))
    parser.add_argument("--seeds", help="comma-separated training seeds (default 0,1,2; smoke 0,1)")
    parser.add_argument("--time-budget-min", type=float, default=None,
                        help="stop before a (row, seed) cell that would end after this many minutes (estimated from "
                             "the row's stored cells, else any stored cell); finished cells are kept")
    parser.add_argument("--candidates", default="", help="instead of the matrix: measure SFT-started students of these "
                                                         "layer counts (e.g. 9,15,20) against the teacher")
    parser.add_argument("--student-layers", type=int, help="layers kept from the fine-tuned teacher for the student")
    parser.add_argument("--sft-steps", type=int, help="steps of the SFT warm start (batch --batch-size)")
    parser.add_argument("--sft-lr", type=float)
    add_budget_flags(parser)
    parser.add_argument("--sample-seeds", help="seeds of the MiniLLM sampling protocol (one sample each)")
    parser.add_argument("--n-boot", type=int, default=2000, help="bootstrap replicates")
    parser.add_argument("--work", help="run directories (default runs/bench-compare-<scale>)")
    parser.add_argument("--out", help="output prefix (default benchmarks/results/compare_<scale>)")
    args = parser.parse_args(argv)
    for key, value in SCALES[args.scale].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.work = args.work or f"runs/bench-compare-{args.scale}"
    args.out = args.out or f"benchmarks/results/compare_{args.scale}"

    def numbers(flag: str, text: str) -> list[int]:
        try:
            values = [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            parser.error(f"{flag}: expected comma-separated integers, got {text!r}")
        if not values or len(set(values)) != len(values):
            parser.error(f"{flag}: expected distinct integers, got {text!r}")
        return values

    args.seed_list = numbers("--seeds", args.seeds)
    args.sample_seed_list = numbers("--sample-seeds", args.sample_seeds)
    args.candidate_list = numbers("--candidates", args.candidates) if args.candidates else []
    args.row_list = [r for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in args.row_list if r not in ROWS]
    if unknown:
        parser.error(f"--rows: unknown rows {unknown}; known: {','.join(ROWS)}")
    # methods.py's shared pieces read these names.
    args.seed, args.decoding = 0, "greedy"
    use_cuda = args.scale == "gpu" and torch.cuda.is_available()
    args.mixed_precision = "bf16" if use_cuda else "no"
    args.device = torch.device("cuda" if use_cuda else "cpu")
    return args


def settings_of(args) -> dict:
    """Everything a cell's numbers depend on (not the seeds, rows or time budget): the cells' folder is keyed by it."""
    keys = ("student_layers", "sft_steps", "sft_lr", "steps", "batch_size", "lr", "teacher_steps", "teacher_batch_size",
            "teacher_lr", "per_domain", "max_prompt_length", "max_length", "gen_tokens", "gkd_new_tokens",
            "ddk_val_per_domain", "mixed_precision", "base_teacher")
    data = Path(args.data)
    return {**{k: getattr(args, k) for k in keys}, "sample_seeds": args.sample_seed_list,
            "data": {name: file_id(data / f"{name}.jsonl") for name in ("train", "validation", "test")
                     if (data / f"{name}.jsonl").is_file()}}


def with_seed(args, seed: int) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), "seed": seed})


def ensure_sft_start(args, teacher_dir: Path, eval_file: Path, layers: int) -> tuple[Path, dict]:
    """The SFT student every row continues from: ``layers`` layers pruned from the fine-tuned teacher, then
    ``--sft-steps`` steps of plain SFT (seed 0); computed once and cached by its settings."""
    settings = {"teacher": teacher_dir.name, "layers": layers, "steps": args.sft_steps,
                "batch_size": args.batch_size, "lr": args.sft_lr, "train_data": file_id(Path(args.data) / "train.jsonl"),
                "max_prompt_length": args.max_prompt_length, "max_length": args.max_length, "seed": 0,
                "mixed_precision": args.mixed_precision}
    flags = ["--teacher.name_or_path", str(teacher_dir), "--student.num_layers", str(layers),
             "--train.max_steps", str(args.sft_steps), "--train.batch_size", str(args.batch_size),
             "--train.lr", str(args.sft_lr)]
    return train_cached(args, f"sft_start{layers}", settings, flags, args.sft_steps, eval_file)


# What the fine-tuned teacher's test cell depends on: a cells folder whose settings differ only elsewhere (student
# size, method budget) scores the same teacher on the same test sample, so its teacher cell is reused.
TEACHER_CELL_KEYS = ("teacher_steps", "teacher_batch_size", "teacher_lr", "per_domain", "max_prompt_length",
                     "max_length", "gen_tokens", "mixed_precision", "base_teacher", "sample_seeds", "data")
SETTINGS_RECORD = "settings.json"  # in a cells folder: the settings its name is the fingerprint of


def record_settings(cells_dir: Path, settings: dict) -> None:
    cells_dir.mkdir(parents=True, exist_ok=True)
    if not (cells_dir / SETTINGS_RECORD).is_file():
        (cells_dir / SETTINGS_RECORD).write_text(json.dumps(settings, indent=1))


def reuse_teacher_cell(cells_dir: Path, settings: dict) -> Optional[Path]:
    """Copy into ``cells_dir`` the teacher cell of another cells folder (beside it) whose settings agree on
    :data:`TEACHER_CELL_KEYS` and whose recorded teacher (``shared.json``: its settings and per-step losses) is the
    one ``cells_dir`` records; the teacher's evaluation (≈ 20 min of this CPU) is then not repeated. The copied
    record is noted in the cell (``reused_from``). Returns the source folder, or None."""
    mine = json.loads((cells_dir / SHARED_RECORD).read_text()).get("teacher_ft") if (cells_dir / SHARED_RECORD).is_file() else None
    if mine is None or (cells_dir / "teacher_ft.json").is_file():
        return None
    for other in sorted(p for p in cells_dir.parent.iterdir() if p.is_dir() and p != cells_dir):
        files = [other / name for name in ("teacher_ft.json", SETTINGS_RECORD, SHARED_RECORD)]
        if not all(f.is_file() for f in files):
            continue
        theirs = json.loads(files[1].read_text())
        if any(theirs.get(k) != settings.get(k) for k in TEACHER_CELL_KEYS):
            continue
        if json.loads(files[2].read_text()).get("teacher_ft") != mine:
            continue
        cell = json.loads(files[0].read_text())
        store_cell(cells_dir / "teacher_ft.json", {**cell, "reused_from": other.name})
        return other
    return None


def check_shared(cells_dir: Path, kind: str, info: dict) -> None:
    """The shared parts (fine-tuned teacher, SFT starts) live in a machine-local cache, so a session on a fresh
    machine trains them again; the cells stored by earlier sessions were scored against the earlier ones. Record
    each part's per-step training losses in ``<cells>/shared.json`` the first time, and stop if a recomputed part's
    losses differ (the cells could not be mixed then): training is seeded and deterministic on CPU, so they should
    match exactly."""
    record_file = cells_dir / SHARED_RECORD
    record = json.loads(record_file.read_text()) if record_file.is_file() else {}
    losses = [m["loss"] for m in info.get("metrics", []) if "loss" in m]
    entry = {"settings": info.get("settings"), "losses": losses}
    known = record.get(kind)
    if known is not None and known["settings"] == entry["settings"]:
        if len(known["losses"]) != len(losses) or any(
                abs(a - b) > 1e-4 * max(1.0, abs(a)) for a, b in zip(known["losses"], losses)):
            raise SystemExit(f"{kind}: its training losses differ from the ones recorded in {record_file} when the "
                             f"stored cells were scored (first: {known['losses'][:3]} vs now {losses[:3]}); the cells "
                             f"of {cells_dir} were scored against another {kind}: move that folder aside to start over")
        return
    record[kind] = entry
    store_cell(record_file, record)


def check_evaluation(cells_dir: Path, eval_batch_size: int) -> None:
    """The sampled generations draw one random stream per evaluation batch (:mod:`kdlm.generation`), so cells scored
    with another ``--eval-batch-size`` hold other (equally distributed) samples and cannot be paired example by
    example. Record the batch size under ``evaluation`` in ``<cells>/shared.json`` (for a folder stored before the
    record existed: the ``--eval.batch_size`` of its cells' commands) and stop, before any work, when this invocation
    asks for another one."""
    record_file = cells_dir / SHARED_RECORD
    record = json.loads(record_file.read_text()) if record_file.is_file() else {}
    cells = [f for f in sorted(cells_dir.glob("*.json")) if f.name not in (SHARED_RECORD, SETTINGS_RECORD)] \
        if cells_dir.is_dir() else []
    known: set[int] = set()
    if cells and "evaluation" in record:
        known, where = {int(record["evaluation"]["eval_batch_size"])}, f"{record_file}, evaluation"
    elif cells:
        commands = [json.loads(f.read_text()).get("command", "") for f in cells]
        known = {int(m.group(1)) for c in commands if (m := re.search(r"--eval\.batch_size (\d+)", c))}
        where = "the --eval.batch_size of the cells' commands"
    if known and known != {eval_batch_size}:
        raise SystemExit(f"--eval-batch-size {eval_batch_size}: the cells in {cells_dir} were scored with "
                         f"--eval-batch-size {', '.join(map(str, sorted(known)))} (recorded in {where}); the sampled "
                         f"generations draw one random stream per batch, so other batches give other samples that "
                         f"cannot be paired with theirs. Rerun with --eval-batch-size {min(known)}, or give --out "
                         f"another prefix to start a separate set of cells.")
    if record.get("evaluation") != {"eval_batch_size": eval_batch_size}:
        record["evaluation"] = {"eval_batch_size": eval_batch_size}
        store_cell(record_file, record)


def evaluate_cell(evaluator: Evaluator, args, model_dir: Path, run_dir: Path) -> dict:
    """One model's evaluation: per-example scores (:data:`SCORES`), the overall and per-domain aggregates, and
    ``eval_greedy.json`` / ``eval_sample.json`` + predictions in ``run_dir`` (for ``kdlm report``)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    model = evaluator.load(model_dir)
    t0 = time.time()
    kl, tokens = evaluator.per_example_kl(model)
    t1 = time.time()
    greedy, greedy_scores = evaluator.generate(model, "greedy", [], run_dir / "predictions_greedy.jsonl")
    sample, sample_scores = evaluator.generate(model, "sample", args.sample_seed_list, run_dir / "predictions_sample.jsonl")
    t2 = time.time()
    del model
    domains = [e.domain for e in evaluator.examples]
    # Token-weighted KL overall and per domain (every response token counts once, as kdlm eval reports it).
    def token_kl(pick) -> float:
        chosen = [i for i in range(len(kl)) if pick(i)]
        return sum(kl[i] * tokens[i] for i in chosen) / max(1, sum(tokens[i] for i in chosen))

    tf = {"overall": {"kl": token_kl(lambda i: True), "tokens": sum(tokens)}}
    for d in dict.fromkeys(domains):
        tf[f"domain/{d}"] = {"kl": token_kl(lambda i, d=d: domains[i] == d),
                             "tokens": sum(t for t, dd in zip(tokens, domains) if dd == d)}
    for name, gen in (("greedy", greedy), ("sample", sample)):
        (run_dir / f"eval_{name}.json").write_text(json.dumps({**tf, "generation": gen}, indent=1))
    aggregate = {
        "kl": tf["overall"]["kl"],
        **{f"{m}_{name}": gen["mean"]["overall"][m] for name, gen in (("greedy", greedy), ("sample", sample))
           for m in ("rouge_l", "exact_match")},
        "domains": {d: {"kl": tf[f"domain/{d}"]["kl"], "rouge_l_sample": sample["mean"]["domains"][d]["rouge_l"],
                        "rouge_l_greedy": greedy["mean"]["domains"][d]["rouge_l"]} for d in dict.fromkeys(domains)},
    }
    per_example = {"kl": kl, "tokens": tokens, "rouge_l_greedy": greedy_scores["rouge_l"],
                   "exact_match_greedy": greedy_scores["exact_match"], "rouge_l_sample": sample_scores["rouge_l"],
                   "exact_match_sample": sample_scores["exact_match"]}
    return {"aggregate": aggregate, "per_example": per_example, "domains": domains,
            "kl_seconds": t1 - t0, "generation_seconds": t2 - t1}


def train_row(args, row: str, seed: int, teacher_dir: Path, sft_dir: Path, eval_file: Path, run_dir: Path) -> dict:
    """Continue the SFT start with ``row``'s recipe for the shared budget (training seed ``seed``)."""
    recipe, extra = ROWS[row]
    shutil.rmtree(run_dir, ignore_errors=True)
    seeded = with_seed(args, seed)
    flags = ["--teacher.name_or_path", str(teacher_dir), "--student.init", "pretrained",
             "--student.name_or_path", str(sft_dir), "--train.max_steps", str(args.steps),
             "--train.batch_size", str(args.batch_size), "--train.lr", str(args.lr),
             *common_overrides(seeded, run_dir, eval_file), *extra,
             *recipe_flags(args, recipe, mixing=row != "ddk_natural")]
    cfg, _ = parse_config(["--config", str(ROOT / "configs" / f"{recipe}.yaml"), *flags])
    t0 = time.time()
    summary = distill(cfg)
    seconds = time.time() - t0
    metrics = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return {"command": as_command(recipe, flags), "train_seconds": seconds, "s_per_step": step_seconds(run_dir, args.steps),
            "peak_rss_gb": summary.get("peak_rss_gb"), "final_train_metrics": metrics[-1] if metrics else {},
            "train_examples_kept": summary["data"]["train"]["kept"]}


# ------------------------------------------------------------------------------------------------ cells
def cell_path(cells: Path, row: str, seed: Optional[int]) -> Path:
    return cells / (f"{row}.json" if seed is None else f"{row}-seed{seed}.json")


def store_cell(path: Path, cell: dict) -> None:
    """Write a cell (or a record beside the cells) atomically: a process beside this one never reads half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(cell, indent=1))
    tmp.replace(path)  # a cell exists only when complete


def claim_cell(cells: Path, row: str, seed: int) -> Optional[str]:
    """Claim a cell for this process: ``<row>-seed<k>.claim`` (pid, host, start), created exclusively.

    Returns None when claimed, else why not (the process that holds it). Two pieces given the same rows then share
    them out cell by cell instead of training a cell twice. A claim whose process is gone on this host (killed, the
    machine rebooted) is taken over; one from another host is held until its file is removed.
    """
    path = cell_path(cells, row, seed).with_suffix(".claim")
    cells.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": os.uname().nodename, "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(2):
        try:
            with open(path, "x") as file:
                json.dump(me, file)
            return None
        except FileExistsError:
            try:
                holder = json.loads(path.read_text())
                pid = int(holder["pid"])
            except (OSError, ValueError, TypeError, KeyError):  # being written now, removed meanwhile, or edited
                return f"claimed in {path} (remove it if no piece is running this cell)"
            if holder.get("host") != me["host"] or _alive(pid):
                return (f"running in process {holder.get('pid')} on {holder.get('host')} since {holder.get('since')} "
                        f"({path}; remove it if that process is gone)")
            path.unlink(missing_ok=True)  # its process is gone: take the cell over
    return f"claimed in {path}"


def release_cell(cells: Path, row: str, seed: int) -> None:
    """Remove this process's claim on a cell (done, or given up)."""
    path = cell_path(cells, row, seed).with_suffix(".claim")
    try:
        holder = json.loads(path.read_text())
        if (holder.get("pid"), holder.get("host")) == (os.getpid(), os.uname().nodename):
            path.unlink()
    except (OSError, ValueError):
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return pid > 0


def load_cells(cells: Path) -> dict[str, dict[Optional[int], dict]]:
    """Every stored cell: row -> seed (None for the seed-free base rows) -> cell."""
    found: dict[str, dict[Optional[int], dict]] = {}
    for file in sorted(cells.glob("*.json")) if cells.is_dir() else []:
        if file.name in (SHARED_RECORD, SETTINGS_RECORD):  # records beside the cells, not cells
            continue
        cell = json.loads(file.read_text())
        found.setdefault(cell["row"], {})[cell.get("seed")] = cell
    return found


def cell_threads(cell: dict) -> int:
    """The torch threads a cell ran with; cells stored before the field was recorded all ran with the 2-core
    reference machine's default, 2."""
    return int(cell.get("threads", 2))


def estimate_seconds(cells: dict, row: str) -> Optional[float]:
    """A cell's expected duration: the median of the row's stored cells, else of every stored method cell, each
    from the cells run with this invocation's thread count when there are any (two pieces side by side with one
    thread each take about 1.6x as long per cell: benchmarks/cpu_cell_parallelism.py)."""
    threads = torch.get_num_threads()

    def pool(rows) -> list[float]:
        done = [c for r, by in cells.items() if r in rows for c in by.values() if "seconds" in c]
        same = [c["seconds"] for c in done if cell_threads(c) == threads]
        return same or [c["seconds"] for c in done]

    found = pool({row}) or pool(set(ROWS))
    return float(np.median(found)) if found else None


# ------------------------------------------------------------------------------------------------ summary
def matrix(by_seed: dict, metric: str, seeds: list) -> np.ndarray:
    return np.array([by_seed[s]["per_example"][metric] for s in seeds], dtype=float)


def summarise(cells: dict, args) -> dict:
    """Per row: mean ± t-interval over seeds of every aggregate, per-domain means, paired differences against
    ``sft`` and ``fkl``, gap closed; and the claims. Rows without cells are listed as not run."""
    teacher = cells.get("teacher_ft", {}).get(None)
    any_cell = teacher or next((c for by in cells.values() for c in by.values()), None)
    domains = any_cell["domains"] if any_cell else []
    rows: dict[str, dict] = {}
    # the thread count of a cell run alone: the most any timed cell used (pieces side by side use fewer)
    alone_threads = max((cell_threads(c) for by in cells.values() for c in by.values() if c.get("s_per_step")),
                        default=None)
    for row in (*BASE, *ROWS):
        by_seed = cells.get(row, {})
        if not by_seed:
            continue
        seeds = sorted(by_seed, key=lambda s: -1 if s is None else s)
        entry: dict = {"seeds": seeds}
        for metric in ("rouge_l_sample", "rouge_l_greedy", "exact_match_sample", "exact_match_greedy", "kl"):
            entry[metric] = _interval_json(t_interval([by_seed[s]["aggregate"][metric] for s in seeds]))
        entry["domains"] = {d: {m: float(np.mean([by_seed[s]["aggregate"]["domains"][d][m] for s in seeds]))
                                for m in ("rouge_l_sample", "kl")} for d in dict.fromkeys(domains)}
        # The cost column compares rows only when their cells ran alike: the cells run alone (most threads) when
        # there are any, else those run as one of two pieces side by side (flagged in the table)
        timed = [by_seed[s] for s in seeds if by_seed[s].get("s_per_step")]
        most = max((cell_threads(c) for c in timed), default=None)
        secs = [c["s_per_step"] for c in timed if cell_threads(c) == most]
        entry["s_per_step"] = float(np.mean(secs)) if secs else None
        entry["s_per_step_alone"] = most is None or most == alone_threads
        if row in ROWS:
            for reference in ("sft", "fkl"):
                if reference == row or reference not in cells:
                    continue
                common = sorted(set(by_seed) & set(cells[reference]))
                if not common:
                    continue
                for metric in ("rouge_l_sample", "rouge_l_greedy", "kl"):
                    diff = paired_difference(matrix(by_seed, metric, common), matrix(cells[reference], metric, common),
                                             domains, n_boot=args.n_boot)
                    entry[f"diff_vs_{reference}_{metric}"] = _interval_json(diff) | {"seeds": common}
            if teacher is not None and "sft" in cells and row != "sft":  # SFT against itself: 0 by definition
                common = sorted(set(by_seed) & set(cells["sft"]))
                if common:
                    for metric in ("rouge_l_sample", "kl"):
                        gap = gap_closed(matrix(by_seed, metric, common), matrix(cells["sft"], metric, common),
                                         matrix({None: teacher}, metric, [None]), domains, n_boot=args.n_boot)
                        entry[f"gap_closed_{metric}"] = _interval_json(gap)
        rows[row] = entry
    # Claims: every row's seeds that all compared rows share (check_claims pairs them seed by seed).
    scores = {metric: {row: {s: np.array(c["per_example"][metric]) for s, c in by.items()}
                       for row, by in cells.items() if row in ROWS} for metric in SCORES}
    claims = check_claims(scores, domains, n_boot=args.n_boot) if domains else []
    # The same comparisons on the other metrics: supporting evidence, the verdicts above stay the papers' metric's
    secondary = {metric: check_claims(scores, domains, claims=on_metric(CLAIMS, metric, higher), n_boot=args.n_boot)
                 for metric, higher in SECONDARY_METRICS} if domains else {}
    return {"rows": rows, "domains": {d: domains.count(d) for d in dict.fromkeys(domains)}, "claims": claims,
            "claims_secondary": secondary, "teacher_sft_gap": _gap(rows)}


def _interval_json(interval: Interval) -> dict:
    return {"mean": interval.estimate, "low": interval.low, "high": interval.high, "method": interval.method}


def _gap(rows: dict) -> Optional[dict]:
    """What the methods must close: the fine-tuned teacher minus the continued-SFT row (else the SFT start)."""
    sft = rows.get("sft") or rows.get("sft_start")
    if "teacher_ft" not in rows or sft is None:
        return None
    return {m: rows["teacher_ft"][m]["mean"] - sft[m]["mean"] for m in ("rouge_l_sample", "rouge_l_greedy", "kl")}


def _fmt(value: Optional[dict], digits: int = 1, pm: bool = True) -> str:
    if not value:
        return "—"
    interval = Interval(value["mean"], value["low"], value["high"])
    return interval.format_pm(digits) if pm else interval.format(digits)


def _step_cost(entry: dict) -> str:
    """The s/step cell: ‡ marks a row timed only in cells run with fewer threads than the matrix's others (two pieces
    side by side), which are slower per step and not comparable with the rest."""
    if not entry.get("s_per_step"):
        return "—"
    return f"{entry['s_per_step']:.1f}" + ("" if entry.get("s_per_step_alone", True) else "‡")


def write_outputs(args, summary: dict, planned: list[tuple[str, Optional[int]]], out: Path, phases: dict) -> None:
    rows, domains = summary["rows"], summary["domains"]
    claims, secondary = summary.pop("claims"), summary.pop("claims_secondary", {})

    def claims_json(results) -> list[dict]:
        return [{"paper": r.claim.paper, "claim": r.claim.claim, "metric": r.claim.metric, "verdict": r.verdict,
                 "comparisons": [{"better": c.better, "worse": c.worse, "verdict": c.verdict,
                                  "improvement": _interval_json(c.improvement) if c.improvement else None}
                                 for c in r.comparisons]} for r in results]

    payload = {"command": " ".join(["nice -n 10 .venv/bin/python benchmarks/compare.py", *sys.argv[1:]]),
               "settings": settings_of(args), "seeds": args.seed_list, **summary, "phases": phases,
               "claims": claims_json(claims),
               "claims_secondary": {metric: claims_json(results) for metric, results in secondary.items()},
               "not_run": [f"{row}" + ("" if seed is None else f" seed {seed}") for row, seed in planned
                           if seed not in rows.get(row, {}).get("seeds", [])]}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")  # per process: a piece running beside this one writes too
    tmp.write_text(json.dumps(payload, indent=1, default=float))
    tmp.replace(out.with_suffix(".json"))
    s = payload["settings"]
    seeds_run = sorted({seed for r in rows.values() for seed in r.get("seeds", []) if seed is not None})
    lines = [
        f"# Method comparison on t0mix, issue-20 protocol ({args.scale} scale)", "",
        f"Command of the last piece: `{payload['command']}` (the tables hold every stored cell of these settings, "
        "from every piece).", "",
        f"Teacher: the demo teacher fine-tuned on t0mix train ({s['teacher_steps']} steps × {s['teacher_batch_size']}, "
        f"lr {s['teacher_lr']}). SFT start: {s['student_layers']} layers pruned from it, then {s['sft_steps']} steps × "
        f"{s['batch_size']} of SFT (lr {s['sft_lr']}). Every row continues from the SFT start for {s['steps']} steps × "
        f"{s['batch_size']} (lr {s['lr']}), training seeds {seeds_run} (each row's: the seeds column). Test: t0mix "
        f"test, the first ≤ "
        f"{s['per_domain']} examples per domain with a fitting prompt ({sum(domains.values())} in all); greedy and "
        f"sampled (τ 1, top-p 1, seeds {s['sample_seeds']}, scores averaged) generations of ≤ {s['gen_tokens']} tokens; "
        "ROUGE-L and exact match ×100; KL = per-token KL(fine-tuned teacher ‖ model) in nats on the references.",
        "",
        "Columns: mean ± 95 % t-interval over the training seeds; Δ = paired difference against the continued SFT "
        "row / FKL (bootstrap over seeds and domain-stratified examples, 95 %); gap closed = (method − SFT) / "
        "(teacher − SFT) on sampled ROUGE-L and on KL.", "",
        "| row | seeds | ROUGE-L (sampled) | ROUGE-L (greedy) | EM (sampled) | EM (greedy) | KL | Δ ROUGE-L vs SFT | "
        "Δ ROUGE-L vs FKL | Δ KL vs SFT | gap closed (ROUGE-L) | gap closed (KL) | s/step |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in (*BASE, *ROWS):
        if row not in rows:
            if row in BASE or row in args.row_list:
                lines.append(f"| {LABELS[row]} | *not run yet* |" + " |" * 11)
            continue
        e = rows[row]
        seeds = "—" if e["seeds"] == [None] else ",".join(map(str, e["seeds"]))
        lines.append(" | ".join([
            f"| {LABELS[row]}", seeds, _fmt(e["rouge_l_sample"]), _fmt(e["rouge_l_greedy"]),
            _fmt(e["exact_match_sample"]), _fmt(e["exact_match_greedy"]), _fmt(e["kl"], 3),
            _fmt(e.get("diff_vs_sft_rouge_l_sample"), 1, False), _fmt(e.get("diff_vs_fkl_rouge_l_sample"), 1, False),
            _fmt(e.get("diff_vs_sft_kl"), 3, False), _fmt(e.get("gap_closed_rouge_l_sample"), 2, False),
            _fmt(e.get("gap_closed_kl"), 2, False), _step_cost(e)]) + " |")
    gap = summary["teacher_sft_gap"]
    if gap:
        lines += ["", f"Teacher − SFT gap the methods must close: ROUGE-L (sampled) {gap['rouge_l_sample']:+.1f}, "
                      f"ROUGE-L (greedy) {gap['rouge_l_greedy']:+.1f}, KL {gap['kl']:+.3f} nats/token."]
    short = [DOMAIN_SHORT.get(d, d) for d in domains]
    lines += ["", "Per domain, mean over seeds: ROUGE-L (sampled) / KL.", "",
              "| row | " + " | ".join(short) + " |", "|---|" + "---|" * len(short)]
    for row in (*BASE, *ROWS):
        if row in rows:
            lines.append(f"| {LABELS[row]} | " + " | ".join(
                f"{rows[row]['domains'][d]['rouge_l_sample']:.1f} / {rows[row]['domains'][d]['kl']:.2f}"
                for d in domains) + " |")
    lines += ["", "## Claims of the seed papers", "",
              "Verdict from the paired 95 % bootstrap interval of the improvement: above 0 holds, below 0 does not "
              "hold, containing 0 not resolved at this budget.", "", claims_markdown(claims, LABELS)]
    if secondary:
        lines += ["", "The same comparisons on the other metrics (supporting evidence; the verdicts above are the "
                      "papers' metric's): improvement [95 % CI] and verdict.", "",
                  "| paper | comparison | " + " | ".join(METRIC_NAMES[m] for m in secondary) + " |",
                  "|---|---|" + "---|" * len(secondary)]
        for results in zip(*secondary.values()):
            for k, first in enumerate(results[0].comparisons):
                cells_ = [r.comparisons[k] for r in results]
                lines.append(f"| {results[0].claim.paper} | {LABELS.get(first.better, first.better)} vs "
                             f"{LABELS.get(first.worse, first.worse)} | " + " | ".join(
                                 f"{c.improvement.format(2)} ({c.verdict})" if c.improvement is not None else "not run"
                                 for c in cells_) + " |")
    if any(_step_cost(e).endswith("‡") for e in rows.values()):
        lines += ["", "‡ s/step from cells run with 1 thread as one of two pieces side by side (each step slower than "
                      "a lone cell's; the pair finishes sooner: `benchmarks/cpu_cell_parallelism.py`)."]
    if payload["not_run"]:
        lines += ["", f"Not run yet ({len(payload['not_run'])} cells): " + ", ".join(payload["not_run"]) + "."]
    lines += ["", "Domains (test examples): " + ", ".join(f"{DOMAIN_SHORT.get(d, d)} = {d} ({n})"
                                                      for d, n in domains.items()) + "."]
    if phases:
        lines += ["", "Wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in phases.items()) + "."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------------------ main
def run_candidates(args, teacher_dir: Path, eval_file: Path, evaluator: Evaluator, teacher_cell: dict,
                   cells_dir: Path) -> None:
    """Measure SFT-started students of each ``--candidates`` size against the teacher (the student choice)."""
    out = Path(args.out + "_candidates")
    rows = []
    for layers in args.candidate_list:
        t0 = time.time()
        folder, info = ensure_sft_start(args, teacher_dir, eval_file, layers)
        check_shared(cells_dir, f"sft_start{layers}", info)
        stored = cell_path(cells_dir, f"candidate{layers}", None)  # a rerun (another candidate added) skips it
        if stored.is_file():
            rows.append(json.loads(stored.read_text())["candidate"])
            continue
        cell = evaluate_cell(evaluator, args, folder, Path(args.work) / f"candidate{layers}")
        rows.append({"layers": layers, "sft_seconds": info["train_seconds"], "s_per_step": info["s_per_step"],
                     **{k: v for k, v in cell["aggregate"].items() if k != "domains"}, "seconds": time.time() - t0})
        store_cell(stored, {"row": f"candidate{layers}", "seed": None, "candidate": rows[-1], **cell})
        print(f"[candidate {layers}] {rows[-1]}", flush=True)
    t = teacher_cell["aggregate"]
    lines = [f"# Student candidates ({args.scale} scale): SFT-started students vs the fine-tuned teacher", "",
             f"Each: layers pruned from the fine-tuned teacher, then {args.sft_steps} steps × {args.batch_size} SFT "
             f"(lr {args.sft_lr}); test as in compare_{args.scale}.md ({len(teacher_cell['domains'])} examples).", "",
             "| student | ROUGE-L (sampled) | ROUGE-L (greedy) | EM (greedy) | KL | SFT s/step |", "|---|---|---|---|---|---|",
             f"| fine-tuned teacher | {t['rouge_l_sample']:.1f} | {t['rouge_l_greedy']:.1f} | {t['exact_match_greedy']:.1f} "
             f"| 0 | — |"]
    lines += [f"| {r['layers']} layers | {r['rouge_l_sample']:.1f} | {r['rouge_l_greedy']:.1f} | "
              f"{r['exact_match_greedy']:.1f} | {r['kl']:.3f} | {r['s_per_step']:.1f} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"settings": settings_of(args), "teacher": t, "candidates": rows},
                                                   indent=1))
    print(out.with_suffix(".md").read_text())


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    started = time.time()
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    settings = settings_of(args)
    cells_dir = Path(args.out + "_cells") / fingerprint(settings)
    print(f"settings {json.dumps(settings)}; cells in {cells_dir}; device {args.device}", flush=True)
    check_evaluation(cells_dir, args.eval_batch_size)

    eval_file = work / "test_subset.jsonl"
    write_subset(args, load_tokenizer(args.base_teacher), eval_file)
    teacher_dir, teacher_info = ensure_teacher(args, eval_file)
    record_settings(cells_dir, settings)
    check_shared(cells_dir, "teacher_ft", teacher_info)
    source = reuse_teacher_cell(cells_dir, settings)
    if source is not None:
        print(f"[teacher_ft] test cell reused from {source} (same teacher, same test sample)", flush=True)
    memo = work / f"teacher_hidden-{fingerprint([teacher_dir.name, file_id(eval_file), args.eval_batch_size])}.pt"
    evaluator = Evaluator(args, teacher_dir, eval_file, args.device, memo_file=memo)
    cells = load_cells(cells_dir)
    phases: dict[str, float] = {}

    def base_cell(row: str, model_dir: Path) -> dict:
        if None not in cells.get(row, {}):
            t0 = time.time()
            cell = {"row": row, "seed": None, **evaluate_cell(evaluator, args, model_dir, work / row)}
            cell["seconds"] = time.time() - t0
            store_cell(cell_path(cells_dir, row, None), cell)
            cells.setdefault(row, {})[None] = cell
        return cells[row][None]

    teacher_cell = base_cell("teacher_ft", teacher_dir)
    if args.candidate_list:
        run_candidates(args, teacher_dir, eval_file, evaluator, teacher_cell, cells_dir)
        return 0
    sft_dir, sft_info = ensure_sft_start(args, teacher_dir, eval_file, args.student_layers)
    check_shared(cells_dir, f"sft_start{args.student_layers}", sft_info)
    phases["SFT start"] = sft_info["train_seconds"]
    candidate = cells.get(f"candidate{args.student_layers}", {}).get(None)
    if None not in cells.get("sft_start", {}) and candidate and "per_example" in candidate:
        # --candidates already scored this very student (same SFT start, same test sample)
        cells.setdefault("sft_start", {})[None] = {**candidate, "row": "sft_start"}
        store_cell(cell_path(cells_dir, "sft_start", None), cells["sft_start"][None])
    base_cell("sft_start", sft_dir)

    planned = [(row, seed) for row in args.row_list for seed in args.seed_list]
    stopped = None
    for row, seed in planned:
        if seed in cells.get(row, {}):
            print(f"[{row} seed {seed}] done before, skipped", flush=True)
            continue
        held = claim_cell(cells_dir, row, seed)  # a piece given the same rows may be training this cell
        if held:
            print(f"[{row} seed {seed}] {held}: skipped", flush=True)
            continue
        stored = cell_path(cells_dir, row, seed)
        if stored.exists():  # stored by a piece beside this one since this invocation loaded the cells
            release_cell(cells_dir, row, seed)
            cells.setdefault(row, {})[seed] = json.loads(stored.read_text())
            print(f"[{row} seed {seed}] done by a piece beside this one, skipped", flush=True)
            continue
        elapsed, expected = time.time() - started, estimate_seconds(cells, row)
        if args.time_budget_min is not None and elapsed + (expected or 0.0) > 60 * args.time_budget_min:
            release_cell(cells_dir, row, seed)
            stopped = (row, seed)
            break
        print(f"[{row} seed {seed}] ...", flush=True)
        t0 = time.time()
        run_dir = work / f"{row}-seed{seed}"
        try:
            cell = {"row": row, "seed": seed, **train_row(args, row, seed, teacher_dir, sft_dir, eval_file, run_dir)}
            cell.update(evaluate_cell(evaluator, args, run_dir / "final", run_dir))
            cell["seconds"], cell["threads"] = time.time() - t0, torch.get_num_threads()
            store_cell(stored, cell)
        finally:  # stored, or failed: either way no longer this process's
            release_cell(cells_dir, row, seed)
        cells.setdefault(row, {})[seed] = cell
        a = cell["aggregate"]
        print(f"[{row} seed {seed}] ROUGE-L sampled {a['rouge_l_sample']:.2f} greedy {a['rouge_l_greedy']:.2f} "
              f"KL {a['kl']:.4f} ({cell['seconds']:.0f} s)", flush=True)
    phases["this invocation"] = time.time() - started
    cells = load_cells(cells_dir)  # again: a piece running beside this one may have stored cells since the start
    write_outputs(args, summarise(cells, args), planned, out, phases)
    report_dirs = [work / f"{row}-seed{seed}" for row in ROWS for seed in sorted(s for s in cells.get(row, {}) if s is not None)
                   if (work / f"{row}-seed{seed}" / "config.yaml").is_file()]
    if report_dirs:
        from kdlm.report import build_report

        page = build_report(report_dirs, Path(args.out + "_report"))
        print(f"kdlm report -> {page}", flush=True)
    if stopped is not None:
        left = [f"{r}:{s}" for r, s in planned if s not in cells.get(r, {})]
        print(f"time budget reached before {stopped[0]} seed {stopped[1]}; {len(left)} cells left: {' '.join(left)}; "
              "rerun the same command to continue", flush=True)
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
