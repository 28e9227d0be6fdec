"""Method comparison on ../shared/data/t0mix: every kdlm method from one start and one budget (issue #10).

This is the issue-10 protocol (one seed, every row from the untrained pruned student). The issue-20 protocol, which
can rank methods (an SFT-started student, ≥ 3 seeds per row, intervals, the papers' claims checked), is
``benchmarks/compare.py``; it reuses this module's pieces (:func:`write_subset`, :func:`ensure_teacher` /
:func:`train_cached`, :class:`Evaluator`, :func:`recipe_flags`, :func:`add_budget_flags`).

Exact command of the committed CPU table (from the repository root, after `make install`; on the reference
2-core CPU the 15 rows take about 50 minutes, plus about 10 minutes once for the teacher's fine-tuning, which is
cached; per-phase timings are in the JSON):

    nice -n 5 .venv/bin/python benchmarks/methods.py

and, on a GPU, the scaled-up matrix (bigger budget, longer sequences, bf16 autocast, the MiniLLM sampling
protocol for the text metrics):

    .venv/bin/python benchmarks/methods.py --scale gpu       # writes benchmarks/results/methods_gpu.{json,md}

Protocol (the papers' — MiniLLM, GKD, DPKD, AKL, RLKD — scaled down):

1. **Teacher.** The demo teacher (SmolLM2-135M-Instruct) is a general chat model that answers t0mix's tasks
   verbosely, so it is first fine-tuned on t0mix train with the dataset responses (plain SFT, as MiniLLM's
   teachers are): ``kdlm distill --config configs/sft.yaml --student.init pretrained --student.name_or_path
   <the demo teacher's plain checkpoint> ...`` (see :func:`plain_demo_teacher` for why not ``builtin:...``).
   The result is cached in ``$KDLM_CACHE/bench/teacher_ft-<hash>`` (the hash covers every setting of that run)
   and reused by later runs.
2. **Start.** Every method row starts from the 9-layer student pruned from the *fine-tuned* teacher
   (``student.init: prune_teacher``), with the fine-tuned teacher as the teacher.
3. **Training.** Same data (t0mix train, dataset responses; prompts longer than ``--max-prompt-length`` tokens
   dropped, sequences cut at ``--max-length``), same steps × batch, learning rate and seed for every method.
   Each method is its shipped recipe (``configs/<recipe>.yaml``) with only data/teacher/train keys overridden,
   except: GKD samples at most ``--gkd-new-tokens`` tokens (48 on CPU instead of the recipe's 128: sampling
   dominates its step), and DDK re-weights every ``steps/4`` steps on ``--ddk-val-per-domain`` validation
   examples per domain (t0mix validation) instead of 50 steps and 500 examples.
4. **Evaluation** on t0mix test, the first ``--per-domain`` examples of each domain whose prompt fits
   ``--max-prompt-length``: kdlm eval's functions (``kdlm.eval.run.generation_metrics``: ROUGE-L and exact
   match per domain and overall, greedy on CPU; ``kdlm.eval.teacher_forced.teacher_forced_metrics``: per-token
   KL(fine-tuned teacher ‖ model) on the test references). Rows: the original teacher, the fine-tuned teacher,
   the untrained pruned student, and one row per method (``sft`` is the SFT-only student baseline).

Cached: the fine-tuned teacher (above); its decoder's hidden states on the test batches, computed once per
invocation for the KL of every row (:class:`MemoTeacher`); DDK's teacher perplexities (kdlm caches them). The
teacher's training-time outputs are not cached: every method runs the live teacher, as its recipe says (kdlm's
offline teacher cache would serve only the six plain-divergence rows, and approximately).

Resumable: every finished row is stored in ``<out>.json`` (with its settings) and skipped on a rerun with the same
settings; ``<out>.md`` (the table) is rewritten after every row and marks rows not run yet. Run directories (a
kdlm run each: ``config.yaml``, ``metrics.jsonl``, ``summary.json``, ``final/``, ``eval_final.json``,
``predictions_final.jsonl``) are under ``--work``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import torch
from torch import nn

from kdlm.cli import parse_config
from kdlm.config import DEMO_TEACHER
from kdlm.data import read_examples, render_prompt, tokenize_examples
from kdlm.data.format import encode_prompt
from kdlm.eval.metrics import exact_match_multi, rouge_l_multi
from kdlm.eval.run import generation_metrics
from kdlm.eval.teacher_forced import teacher_forced_metrics
from kdlm.models import cache_root, load_model, load_models, load_tokenizer, resolve_source, save_student
from kdlm.train.loop import distill

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "t0mix"

# Trained rows: name -> (recipe in configs/, extra overrides). Order = the table's order.
METHODS: dict[str, tuple[str, list[str]]] = {
    "sft": ("sft", []),
    "fkl": ("fkl", []),
    "rkl": ("rkl", []),
    "jsd": ("jsd", []),
    "tvd": ("tvd", []),
    "skew_fkl": ("skew_fkl", []),
    "akl": ("akl", []),
    "akl_rlkd": ("akl_rlkd", []),
    "gkd_lambda0.5": ("gkd", ["--objective.lmbda", "0.5"]),
    "gkd_lambda1": ("gkd", ["--objective.lmbda", "1.0"]),
    "dpkd": ("dpkd", []),
    "ddk": ("ddk", []),
}
BASE_ROWS = ("teacher", "teacher_ft", "pruned")
LABELS = {
    "teacher": "original teacher (SmolLM2-135M-Instruct, 30 layers)",
    "teacher_ft": "fine-tuned teacher (SFT on t0mix train)",
    "pruned": "pruned student, untrained (9 of the fine-tuned teacher's layers)",
    "sft": "SFT only (`configs/sft.yaml`)",
    "fkl": "FKL + CE (`fkl.yaml`)",
    "rkl": "RKL + CE (`rkl.yaml`)",
    "jsd": "JSD β 0.5 (`jsd.yaml`)",
    "tvd": "TVD + CE (`tvd.yaml`)",
    "skew_fkl": "skew FKL α 0.1 + CE (`skew_fkl.yaml`)",
    "akl": "AKL + CE (`akl.yaml`)",
    "akl_rlkd": "AKL + ranking (`akl_rlkd.yaml`)",
    "gkd_lambda0.5": "GKD λ 0.5 (`gkd.yaml`)",
    "gkd_lambda1": "GKD λ 1, on-policy (`gkd.yaml`)",
    "dpkd": "DPKD token form (`dpkd.yaml`)",
    "ddk": "DDK mixing, CE + 0.2·KL (`ddk.yaml`)",
}
SCALES = {
    # Defaults per scale; any flag given on the command line wins.
    "cpu": dict(steps=40, batch_size=8, lr=3e-4, teacher_steps=80, teacher_batch_size=8, teacher_lr=1e-4,
                per_domain=20, max_prompt_length=192, max_length=256, gen_tokens=64, gkd_new_tokens=48,
                ddk_val_per_domain=16, eval_batch_size=16, decoding="greedy"),
    "gpu": dict(steps=1000, batch_size=16, lr=3e-4, teacher_steps=2000, teacher_batch_size=16, teacher_lr=5e-5,
                per_domain=100, max_prompt_length=384, max_length=512, gen_tokens=128, gkd_new_tokens=128,
                ddk_val_per_domain=64, eval_batch_size=64, decoding="sample"),
}
DOMAIN_SHORT = {
    "commonsense_qa": "cqa", "concept_to_text": "c2t", "dialogue_summary": "dsum", "headline": "head",
    "news_topic": "news", "reading_comprehension": "rc", "science_qa": "sciq", "sentiment": "sent",
    "summarization": "xsum",
}


def fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def file_id(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def common_overrides(args, output_dir: Path, eval_file: Path) -> list[str]:
    """The data/train/eval keys every run shares (teacher and methods)."""
    flags = [
        "--data.train", str(Path(args.data) / "train.jsonl"), "--data.eval", str(eval_file), "--data.responses", "dataset",
        "--data.max_prompt_length", str(args.max_prompt_length), "--data.max_length", str(args.max_length),
        "--data.max_eval_examples", "null",
        "--train.seed", str(args.seed), "--train.output_dir", str(output_dir), "--train.log_every", "5",
        "--train.progress", "false",
        "--eval.enabled", "false", "--eval.num_samples", "0", "--eval.batch_size", str(args.eval_batch_size),
        "--eval.gen_max_new_tokens", str(args.gen_tokens), "--eval.decoding", args.decoding,
    ]
    if args.mixed_precision != "no":
        flags += ["--train.mixed_precision", args.mixed_precision]
    return flags


def as_command(recipe: str, flags: list[str]) -> str:
    return "kdlm distill --config configs/%s.yaml %s" % (recipe, " ".join(flags))


def write_subset(args, tokenizer, path: Path) -> dict[str, int]:
    """The test subset: per domain, the first ``per_domain`` examples whose templated prompt fits."""
    kept: dict[str, int] = {}
    lines = []
    for line in (Path(args.data) / "test.jsonl").read_text(encoding="utf-8").split("\n"):
        if not line.strip():
            continue
        record = json.loads(line)
        if kept.get(record["domain"], 0) >= args.per_domain or not record["response"].strip():
            continue
        prompt = render_prompt(tokenizer, [{"role": "user", "content": record["prompt"]}])
        if len(encode_prompt(tokenizer, prompt)) > args.max_prompt_length:
            continue
        kept[record["domain"]] = kept.get(record["domain"], 0) + 1
        lines.append(line)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines) + "\n"
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        # written whole or not at all: another invocation (a piece running beside this one) may be reading it
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    return dict(sorted(kept.items()))


def plain_demo_teacher() -> Path:
    """The demo teacher as a plain checkpoint folder that can be fine-tuned AND saved again.

    Works around a kdlm bug: the de-quantised GGUF checkpoint that kdlm caches keeps ``quantization_config``
    (``quant_method: gguf``) in its config.json, so a model loaded from it is flagged as GGUF-quantised and its
    ``save_pretrained`` raises "The model is quantized with gguf and is not serializable": ``kdlm distill
    --student.init pretrained --student.name_or_path builtin:smollm2-135m-instruct`` trains and then fails when it
    saves the student. A copy without that key loads to the same weights and saves normally.
    """
    from kdlm.models import _materialise_gguf  # the cached de-quantised folder (no public accessor)

    source = _materialise_gguf(*resolve_source(DEMO_TEACHER, None), None)
    target = cache_root() / "bench" / f"plain-{source.name}"
    if (target / "config.json").is_file():
        return target
    tmp = Path(tempfile.mkdtemp(dir=cache_root(), prefix=".tmp-"))
    shutil.copytree(source, tmp, dirs_exist_ok=True)
    config = json.loads((tmp / "config.json").read_text())
    config.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, target)
    return target


def base_teacher(args) -> Path:
    """The teacher to fine-tune as a plain checkpoint folder: the demo teacher's (:func:`plain_demo_teacher`), or
    ``--base-teacher`` when it names a local folder (the smoke test's tiny model)."""
    return plain_demo_teacher() if args.base_teacher == DEMO_TEACHER else Path(args.base_teacher)


def ensure_teacher(args, eval_file: Path) -> tuple[Path, dict]:
    """Fine-tune the demo teacher on t0mix train (plain SFT with kdlm), once; cached by its settings."""
    folder, gguf = resolve_source(args.base_teacher, None)
    settings = {
        "base": args.base_teacher, "gguf": gguf, "train_data": file_id(Path(args.data) / "train.jsonl"),
        "steps": args.teacher_steps, "batch_size": args.teacher_batch_size, "lr": args.teacher_lr,
        "max_prompt_length": args.max_prompt_length, "max_length": args.max_length, "seed": args.seed,
        "mixed_precision": args.mixed_precision,
    }
    flags = ["--teacher.name_or_path", args.base_teacher,
             "--student.init", "pretrained", "--student.name_or_path", str(base_teacher(args)),
             "--train.max_steps", str(args.teacher_steps), "--train.batch_size", str(args.teacher_batch_size),
             "--train.lr", str(args.teacher_lr)]
    return train_cached(args, "teacher_ft", settings, flags, args.teacher_steps, eval_file)


def train_cached(args, kind: str, settings: dict, flags: list[str], steps: int, eval_file: Path) -> tuple[Path, dict]:
    """One plain-SFT kdlm run (``configs/sft.yaml`` + ``flags`` + the shared data/train keys), done once: its final
    model is cached in ``$KDLM_CACHE/bench/<kind>-<hash of settings>`` with ``kdlm_bench_<kind>.json`` (settings,
    command, seconds, metrics) and reused by every later run with the same settings. Returns (folder, info)."""
    target = cache_root() / "bench" / f"{kind}-{fingerprint(settings)}"
    info_name = "kdlm_bench_teacher.json" if kind == "teacher_ft" else f"kdlm_bench_{kind}.json"
    info_file = target / info_name
    if (target / "config.json").is_file() and info_file.is_file():
        print(f"[{kind}] cached: {target}", flush=True)
        return target, json.loads(info_file.read_text())
    run_dir = Path(args.work) / kind
    shutil.rmtree(run_dir, ignore_errors=True)
    flags = flags + common_overrides(args, run_dir, eval_file)
    cfg, _ = parse_config(["--config", str(ROOT / "configs" / "sft.yaml"), *flags])
    print(f"[{kind}] SFT: {steps} steps", flush=True)
    t0 = time.time()
    summary = distill(cfg)
    seconds = time.time() - t0
    info = {"settings": settings, "command": as_command("sft", flags), "train_seconds": seconds,
            "s_per_step": seconds / steps, "data": summary.get("data"),
            "peak_rss_gb": summary.get("peak_rss_gb"),
            "metrics": [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]}
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    shutil.copytree(run_dir / "final", tmp, dirs_exist_ok=True)
    (tmp / info_name).write_text(json.dumps(info, indent=1))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    print(f"[{kind}] done in {seconds:.0f} s ({info['s_per_step']:.1f} s/step); cached in {target}", flush=True)
    return target, info


class _MemoDecoder(nn.Module):
    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.decoder, self.memo = decoder, {}

    def forward(self, input_ids, attention_mask):
        key = hashlib.sha256(input_ids.cpu().numpy().tobytes() + attention_mask.cpu().numpy().tobytes()).hexdigest()
        if key not in self.memo:
            self.memo[key] = self.decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return SimpleNamespace(last_hidden_state=self.memo[key])


class MemoTeacher(nn.Module):
    """The fine-tuned teacher as ``teacher_forced_metrics`` uses it, with its decoder's hidden states memoised per
    batch: the teacher and the test batches never change, so its forward pass over the test set (as costly as
    three students' on this CPU) is done once for all rows; the output layer is the teacher's own."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm, self.config = lm, lm.config
        self.base_model = _MemoDecoder(lm.base_model)

    def get_output_embeddings(self):
        return self.lm.get_output_embeddings()

    def load(self, path: Path) -> None:
        """Add the hidden states saved by :meth:`save` (an earlier invocation on the same teacher and test set)."""
        device = next(self.lm.parameters()).device
        self.base_model.memo.update({k: v.to(device) for k, v in torch.load(path, map_location="cpu", weights_only=True).items()})

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # per process: two invocations may save at once
        torch.save({k: v.cpu() for k, v in self.base_model.memo.items()}, tmp)
        tmp.replace(path)


class Evaluator:
    """kdlm eval's measurements for one model folder, against the fine-tuned teacher (loaded once)."""

    def __init__(self, args, teacher_dir: Path, eval_file: Path, device: torch.device,
                 memo_file: Optional[Path] = None):
        """``memo_file``: where the teacher's hidden states on the test batches are kept between invocations
        (loaded when present, written after the first KL evaluation); the caller keys its name by the teacher and
        the test subset."""
        self.args, self.device, self.memo_file = args, device, memo_file
        # The evaluation config: kdlm eval's own settings (decoding, lengths, batch) as every run uses them.
        self.cfg, _ = parse_config(["--teacher.name_or_path", str(teacher_dir),
                                    *common_overrides(args, Path(args.work) / "eval", eval_file)], "eval")
        self.tokenizer = load_tokenizer(str(teacher_dir))
        self.teacher = load_model(str(teacher_dir), dtype="float32").to(device).eval().requires_grad_(False)
        self.memo_teacher = MemoTeacher(self.teacher)
        if memo_file is not None and memo_file.is_file():
            self.memo_teacher.load(memo_file)
        self.vocab_size = max(self.tokenizer.get_vocab().values()) + 1
        self.examples, _ = read_examples(str(eval_file), self.cfg.data)
        self.items, counts = tokenize_examples(self.examples, self.tokenizer, max_prompt_length=args.max_prompt_length,
                                               max_length=args.max_length)
        if len(self.items) != len(self.examples):
            raise RuntimeError(f"test subset: {counts.summary('eval')} (the subset should only hold fitting prompts)")
        self.truncated = counts.truncated_response

    def load(self, model_dir) -> nn.Module:
        return load_model(str(model_dir), dtype="float32").to(self.device).eval()

    def per_example_kl(self, model: nn.Module) -> tuple[list[float], list[int]]:
        """Per test example: the mean per-token KL(fine-tuned teacher ‖ model) on its reference response, and its
        response token count (``teacher_forced_metrics`` with every example labelled as its own domain)."""
        own = [dataclasses.replace(item, domain=str(i)) for i, item in enumerate(self.items)]
        tf = teacher_forced_metrics(model, self.memo_teacher, own, vocab_size=self.vocab_size,
                                    pad_id=self.tokenizer.pad_token_id, batch_size=self.args.eval_batch_size)
        if self.memo_file is not None and not self.memo_file.is_file():
            self.memo_teacher.save(self.memo_file)
        return [tf[f"domain/{i}"]["kl"] for i in range(len(own))], [tf[f"domain/{i}"]["tokens"] for i in range(len(own))]

    def generate(self, model: nn.Module, decoding: str, seeds: list[int], predictions_file: Path) -> tuple[dict, dict]:
        """kdlm eval's generation metrics with ``decoding`` (greedy, or one sampled run per seed at τ 1, top-p 1),
        and per test example the ROUGE-L and exact match (×100), averaged over the seeds."""
        cfg = copy.deepcopy(self.cfg)
        cfg.eval.decoding, cfg.eval.seeds = decoding, list(seeds) if decoding == "sample" else cfg.eval.seeds
        gen = generation_metrics(cfg, model, self.tokenizer, self.examples, predictions_file)
        records = [json.loads(line) for line in predictions_file.read_text().splitlines() if line.strip()]
        n = len(self.examples)
        rouge, em = [0.0] * n, [0.0] * n
        for k, record in enumerate(records):  # seed-major: line k is example k mod n
            rouge[k % n] += rouge_l_multi(record["prediction"], [record["reference"]]) / (len(records) // n)
            em[k % n] += exact_match_multi(record["prediction"], [record["reference"]]) / (len(records) // n)
        return gen, {"rouge_l": rouge, "exact_match": em}

    def __call__(self, model_dir, run_dir: Path) -> dict:
        model = load_model(str(model_dir), dtype="float32").to(self.device).eval()
        t0 = time.time()
        tf = teacher_forced_metrics(model, self.memo_teacher, self.items, vocab_size=self.vocab_size,
                                    pad_id=self.tokenizer.pad_token_id, batch_size=self.args.eval_batch_size)
        t1 = time.time()
        gen = generation_metrics(self.cfg, model, self.tokenizer, self.examples, run_dir / "predictions_final.jsonl")
        t2 = time.time()
        result = {**tf, "generation": gen}
        (run_dir / "eval_final.json").write_text(json.dumps(result, indent=1))  # the file `kdlm eval` writes
        del model
        mean = gen["mean"]
        return {
            "rouge_l": mean["overall"]["rouge_l"], "exact_match": mean["overall"]["exact_match"],
            "kl": tf["overall"]["kl"], "student_ce": tf["overall"]["student_ce"],
            "teacher_ce": tf["overall"]["teacher_ce"], "length": mean["overall"]["length"],
            "rouge_l_std": gen["std"]["overall"]["rouge_l"],
            "domains": {d: {"rouge_l": m["rouge_l"], "exact_match": m["exact_match"],
                            "kl": tf[f"domain/{d}"]["kl"], "count": m["count"]} for d, m in mean["domains"].items()},
            "tokens": tf["overall"]["tokens"], "kl_seconds": t1 - t0, "generation_seconds": t2 - t1,
        }


def recipe_flags(args, recipe: str, mixing: bool = True) -> list[str]:
    """The budget adjustments of a recipe (docstring, item 3): sampling methods sample at most ``--gkd-new-tokens``
    tokens; DDK (``mixing``) re-weights every ``steps/4`` steps on ``--ddk-val-per-domain`` validation examples."""
    if recipe in ("gkd", "dpkd_sequence"):
        return ["--objective.sampling.max_new_tokens", str(args.gkd_new_tokens)]
    if recipe == "ddk" and mixing:
        return ["--data.mixing.interval", str(max(1, args.steps // 4)), "--data.mixing.validation",
                str(Path(args.data) / "validation.jsonl"), "--data.mixing.val_per_domain", str(args.ddk_val_per_domain)]
    return []


def step_seconds(run_dir: Path, steps: int):
    """Seconds per optimizer step without the set-up: from train.log's "eval data" line (data ready, just before
    the step loop; DDK's first perplexities fall inside) to its "done in" line (final student saved)."""
    start = end = None
    for line in (run_dir / "train.log").read_text().splitlines():
        clock = line[:8]
        if " eval data: " in line and start is None:
            start = clock
        elif " done in " in line:
            end = clock
    if start is None or end is None:
        return None
    seconds = lambda hms: sum(int(x) * f for x, f in zip(hms.split(":"), (3600, 60, 1)))  # noqa: E731
    return ((seconds(end) - seconds(start)) % 86400) / steps


def write_outputs(args, result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out.with_suffix(".json"))
    rows, domains = result["rows"], result["test_subset"]
    s = result["settings"]
    sampled = s["decoding"] == "sample"
    lines = [
        f"# Method comparison on t0mix ({args.scale} scale)",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Teacher: SmolLM2-135M-Instruct fine-tuned on t0mix train (SFT, {s['teacher_steps']} steps × "
        f"{s['teacher_batch_size']}, lr {s['teacher_lr']}). Students: its 9-layer pruned copy, then "
        f"{s['steps']} steps × batch {s['batch_size']} (lr {s['lr']}, seed {s['seed']}) per method on t0mix train "
        f"(dataset responses; prompts ≤ {s['max_prompt_length']} tokens, sequences ≤ {s['max_length']}). "
        f"Test: t0mix test, first ≤ {s['per_domain']} examples per domain with a fitting prompt "
        f"({sum(domains.values())} in all); "
        + ("greedy" if not sampled else f"sampled (τ 1, top-k 0, top-p 1; seeds {s['seeds']}, mean)")
        + f" generation of ≤ {s['gen_tokens']} tokens. ROUGE-L and exact match ×100 (kdlm eval's metrics); KL = "
        "mean per-token KL(fine-tuned teacher ‖ model) in nats on the test references. GKD samples ≤ "
        f"{s['gkd_new_tokens']} new tokens; DDK re-weights every {s['ddk_interval']} steps on "
        f"{s['ddk_val_per_domain']} validation examples per domain.",
        "",
        "| model / method | ROUGE-L | EM | KL | " + " | ".join(DOMAIN_SHORT.get(d, d) for d in domains)
        + " | train s (s/step) |",
        "|---|---|---|---|" + "---|" * len(domains) + "---|",
    ]
    for name in (*BASE_ROWS, *METHODS):
        if name not in result["selected"]:
            continue
        row = rows.get(name)
        if row is None:
            lines.append(f"| {LABELS[name]} | *not run yet* | | |" + " |" * len(domains) + " |")
            continue
        ev = row["eval"]
        train = "—"
        if row.get("train_seconds"):
            train = f"{row['train_seconds']:.0f}" + (f" ({row['s_per_step']:.1f})" if row.get("s_per_step") else "")
        lines.append(
            f"| {LABELS[name]} | {ev['rouge_l']:.1f} | {ev['exact_match']:.1f} | {ev['kl']:.3f} | "
            + " | ".join(f"{ev['domains'][d]['rouge_l']:.1f}" if d in ev["domains"] else "—" for d in domains)
            + f" | {train} |"
        )
    lines += ["", "Domains (test examples): " + ", ".join(f"{DOMAIN_SHORT.get(d, d)} = {d} ({n})" for d, n in domains.items())
              + ". Per-domain columns are ROUGE-L."]
    if result.get("phases"):
        lines += ["", "Wall time per phase (s): " + ", ".join(f"{k} {v:.0f}" for k, v in result["phases"].items()) + "."]
    lines += [f"Note: {note}" for note in result.get("notes", [])]  # hand-written remarks kept in the JSON
    (out.with_suffix(".md")).write_text("\n".join(lines) + "\n")


def add_budget_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of the shared budget and data (defaults per ``--scale``; given flags win), also compare.py's."""
    parser.add_argument("--steps", type=int, help="optimizer steps per method")
    parser.add_argument("--batch-size", type=int, help="examples per step per method")
    parser.add_argument("--lr", type=float, help="peak learning rate of the students")
    parser.add_argument("--teacher-steps", type=int, help="SFT steps of the teacher fine-tuning")
    parser.add_argument("--teacher-batch-size", type=int)
    parser.add_argument("--teacher-lr", type=float)
    parser.add_argument("--per-domain", type=int, help="test examples per domain (the fixed sample)")
    parser.add_argument("--max-prompt-length", type=int)
    parser.add_argument("--max-length", type=int)
    parser.add_argument("--gen-tokens", type=int, help="longest generation in the evaluation")
    parser.add_argument("--gkd-new-tokens", type=int, help="sampling.max_new_tokens of GKD (and DPKD's sequence form)")
    parser.add_argument("--ddk-val-per-domain", type=int)
    parser.add_argument("--eval-batch-size", type=int)
    parser.add_argument("--data", default=str(DATA), help="a t0mix-shaped folder (train/validation/test.jsonl)")
    parser.add_argument("--base-teacher", default=DEMO_TEACHER, help="the teacher to fine-tune (default the demo's)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu",
                        help="cpu: the small budget of the committed table; gpu: bigger budget, longer sequences, "
                             "bf16 autocast on cuda, sampled evaluation (MiniLLM protocol, 3 seeds)")
    add_budget_flags(parser)
    parser.add_argument("--decoding", choices=["greedy", "sample"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default="", help="comma-separated rows to run: " + ",".join((*BASE_ROWS, *METHODS)))
    parser.add_argument("--work", help="run directories (default runs/bench-methods-<scale>)")
    parser.add_argument("--out", help="output prefix (default benchmarks/results/methods_<scale>)")
    parser.add_argument("--report-out", help="kdlm report folder (default benchmarks/results/methods_report, "
                                             "methods_gpu_report with --scale gpu)")
    args = parser.parse_args()
    for key, value in SCALES[args.scale].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.work = args.work or f"runs/bench-methods-{args.scale}"
    args.out = args.out or f"benchmarks/results/methods_{args.scale}"
    use_cuda = args.scale == "gpu" and torch.cuda.is_available()
    args.mixed_precision = "bf16" if use_cuda else "no"
    device = torch.device("cuda" if use_cuda else "cpu")
    selected = [r for r in (*BASE_ROWS, *METHODS) if not args.only or r in args.only.split(",")]
    unknown = set(filter(None, args.only.split(","))) - set(BASE_ROWS) - set(METHODS)
    if unknown:
        parser.error(f"--only: unknown rows {sorted(unknown)}")
    ddk_interval = max(1, args.steps // 4)
    settings = {k: getattr(args, k) for k in (
        "steps", "batch_size", "lr", "teacher_steps", "teacher_batch_size", "teacher_lr", "per_domain",
        "max_prompt_length", "max_length", "gen_tokens", "gkd_new_tokens", "ddk_val_per_domain", "decoding", "seed",
        "mixed_precision")}
    settings.update(ddk_interval=ddk_interval, seeds=[10, 20, 30] if args.decoding == "sample" else [])
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    print(f"settings: {json.dumps(settings)}; device {device}; rows {selected}", flush=True)

    result = {"command": " ".join(["nice -n 5 .venv/bin/python benchmarks/methods.py", *sys.argv[1:]]),
              "settings": settings, "rows": {}, "phases": {}, "notes": []}
    if out.with_suffix(".json").is_file():
        stored = json.loads(out.with_suffix(".json").read_text())
        if stored.get("settings") == settings:
            result["rows"], result["phases"] = stored["rows"], stored.get("phases", {})
            result["notes"] = stored.get("notes", [])
            print(f"resuming: rows already done {sorted(result['rows'])}", flush=True)
        else:
            print(f"{out}.json has other settings: its rows are not reused", flush=True)

    # The test subset (tokenised with the demo teacher's tokenizer, which fine-tuning does not change).
    eval_file = work / "test_subset.jsonl"
    result["test_subset"] = write_subset(args, load_tokenizer(args.base_teacher), eval_file)
    print(f"test subset: {result['test_subset']}", flush=True)
    result["selected"] = selected

    t0 = time.time()
    teacher_dir, teacher_info = ensure_teacher(args, eval_file)
    result["teacher_ft"] = {k: v for k, v in teacher_info.items() if k != "metrics"} | {"folder": str(teacher_dir)}
    result["phases"]["teacher fine-tuning"] = teacher_info["train_seconds"]
    print(f"[teacher_ft] ready after {time.time() - t0:.0f} s", flush=True)

    evaluator = Evaluator(args, teacher_dir, eval_file, device)
    ran = False
    result["truncated_test_references"] = evaluator.truncated
    for name in selected:
        if name in result["rows"]:
            print(f"[{name}] done before, skipped", flush=True)
            continue
        print(f"[{name}] ...", flush=True)
        row_start, ran = time.time(), True
        run_dir = work / name
        row: dict = {}
        if name == "teacher":
            model_dir = DEMO_TEACHER  # kdlm resolves it to its cached plain checkpoint
            run_dir.mkdir(parents=True, exist_ok=True)
        elif name == "teacher_ft":
            model_dir = teacher_dir
            run_dir.mkdir(parents=True, exist_ok=True)
        else:
            recipe, extra = METHODS.get(name, ("sft", []))
            shutil.rmtree(run_dir, ignore_errors=True)
            flags = ["--teacher.name_or_path", str(teacher_dir), "--train.max_steps", str(args.steps),
                     "--train.batch_size", str(args.batch_size), "--train.lr", str(args.lr),
                     *common_overrides(args, run_dir, eval_file), *extra]
            flags += recipe_flags(args, recipe)
            cfg, _ = parse_config(["--config", str(ROOT / "configs" / f"{recipe}.yaml"), *flags])
            if name == "pruned":  # the common start, untrained: pruned and saved as kdlm does it
                models = load_models(cfg)
                save_student(models.student, models.tokenizer, run_dir / "final")
                del models
            else:
                row["command"] = as_command(recipe, flags)
                t_train = time.time()
                summary = distill(cfg)
                row["train_seconds"] = time.time() - t_train
                row["s_per_step"] = step_seconds(run_dir, args.steps)
                row["peak_rss_gb"] = summary.get("peak_rss_gb")
                metrics = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
                row["final_train_metrics"] = metrics[-1] if metrics else {}
                row["train_examples_kept"] = summary["data"]["train"]["kept"]
            model_dir = run_dir / "final"
        row["eval"] = evaluator(model_dir, run_dir)
        row["seconds"] = time.time() - row_start
        result["rows"][name] = row
        ev = row["eval"]
        print(f"[{name}] ROUGE-L {ev['rouge_l']:.2f}  EM {ev['exact_match']:.2f}  KL {ev['kl']:.4f}  "
              f"({row['seconds']:.0f} s: train {row.get('train_seconds', 0):.0f}, KL {ev['kl_seconds']:.0f}, "
              f"generation {ev['generation_seconds']:.0f})", flush=True)
        result["phases"]["rows"] = sum(r["seconds"] for r in result["rows"].values())
        result["torch"] = torch.__version__
        write_outputs(args, result, out)
    if ran:  # a rerun that only finds finished rows keeps the wall time of the run that computed them
        result["phases"]["last invocation that ran rows"] = time.time() - started
    write_outputs(args, result, out)

    # A report from the run directories (`kdlm report`, when this kdlm has it): training curves, configs, per-domain
    # metrics and sample generations of every trained row.
    kdlm = Path(sys.executable).with_name("kdlm")
    runs = [str(work / name) for name in METHODS if name in result["rows"] and (work / name / "config.yaml").is_file()]
    if subprocess.run([str(kdlm), "report", "--help"], capture_output=True).returncode != 0:
        print("kdlm report: not available in this kdlm, no report written", flush=True)
    elif runs:
        report_dir = Path(args.report_out or f"benchmarks/results/methods_{'' if args.scale == 'cpu' else 'gpu_'}report")
        shutil.rmtree(report_dir, ignore_errors=True)
        done = subprocess.run([str(kdlm), "report", *runs, "--out", str(report_dir)], capture_output=True, text=True)
        print(f"kdlm report -> {report_dir}" if done.returncode == 0 else f"kdlm report failed: {done.stderr[-2000:]}",
              flush=True)
    print((out.with_suffix(".md")).read_text())


if __name__ == "__main__":
    main()
