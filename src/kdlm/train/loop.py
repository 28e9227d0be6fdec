"""``kdlm distill``: the one training loop, on accelerate. Read :func:`distill` top to bottom.

1. run directory, resolved config, logging        5. optimizer, cosine schedule, accelerate.prepare
2. teacher, student, tokenizer check               6. resume (weights, optimizer, scheduler, RNG, data position)
3. data: read, teacher responses, tokenise,        7. the step loop: accumulate, clip, step, log, evaluate, save
   domain mixing (DDK) when asked for               8. final student + before/after evaluation
4. the objective (kdlm.train.objectives)

Each numbered step is one function below; the order of the steps is part of the run's determinism (seeding, RNG
draws), so it is fixed in :func:`distill`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import signal
import time
import traceback
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from kdlm.config import Config, check_paths, flatten, save_resolved, to_dict
from kdlm.data import collate, load_splits, read_examples, tokenize_examples
from kdlm.data.align import collate_pairs, tokenize_pairs
from kdlm.errors import CheckpointError, DataError, RunDirError, TrainingError
from kdlm.eval.heldout import evaluate_and_report, format_comparison
from kdlm.generation import fill_teacher_responses
from kdlm.logs import setup_logging
from kdlm.models import DecoderOnly, load_models, save_student
from kdlm.train.checkpoint import (TrainState, latest_checkpoint, latest_intact_checkpoint, load_checkpoint,
                                  load_objective_state, save_checkpoint)
from kdlm.train.mixing import DomainMixer, write_mixing_report
from kdlm.train.rundir import claim_run_dir
from kdlm.train import sharding
from kdlm.train.sharding import full_parameters
from kdlm.train.objectives import make_objective

log = logging.getLogger("kdlm")


class EpochSampler(Sampler[int]):
    """A seeded permutation per epoch: epoch e always yields the same order, so a resumed run sees the same data."""

    # No `set_epoch` method on purpose: accelerate's loader calls `set_epoch` with its own pass counter, which
    # restarts at 0 after a resume. The epoch is set only by `_batches`, from the checkpointed data position.
    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


def _batches(accelerator, loader, sampler: EpochSampler, state: TrainState) -> Iterator[dict]:
    """Endless stream of micro-batches that keeps ``state.epoch``/``state.batches_in_epoch`` current."""
    while True:
        sampler.epoch = state.epoch
        skip = state.batches_in_epoch
        for batch in accelerator.skip_first_batches(loader, skip) if skip else loader:
            state.batches_in_epoch += 1
            yield batch
        state.epoch += 1
        state.batches_in_epoch = 0


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics.jsonl lines of steps after ``step`` (written before a crash, redone after the resume)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines(keepends=True) if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(kept))
    tmp.replace(path)  # atomic: a crash here leaves the old or the new file, never half of one


def reset_peak_rss() -> str:
    """Start measuring peak memory now; returns the scope :func:`peak_rss_gb` will report: ``run`` or ``process``.

    Linux (4.0+) lets a process reset its resident-set high-water mark (``/proc/self/clear_refs``, value 5) to its
    current size, so the peak read at the end of a run is that run's own, even when the process ran something
    bigger before (runs started in-process by a benchmark or the tests). Where the reset is not possible the peak
    is the whole process's since it started: ``process``.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return "process"
    return "run"


def peak_rss_gb() -> float:
    """Peak resident memory in GB since the last :func:`reset_peak_rss` (or since the process started):
    ``VmHWM`` of /proc/self/status, else ``ru_maxrss`` (which Linux reports in KiB, and resets with it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


@dataclass
class _Data:
    """Step 3's result: tokenised training and held-out data, their drop counts, and the domain mixer (if any)."""

    train_items: list
    eval_items: list
    eval_examples: list
    counts: dict
    mixer: Optional[DomainMixer]


@dataclass
class _Training:
    """Step 5's result: the prepared student, optimizer, schedule and data loader."""

    student: Any  # DecoderOnly, wrapped by accelerate (ddp) or sharded in place (fsdp)
    student_lm: Any  # the bare causal LM inside it
    optimizer: Any
    scheduler: Any
    loader: Any
    sampler: EpochSampler
    total_steps: int


@dataclass
class _Logger:
    """Step 7's metrics.jsonl / tracker / progress-bar writer; throughput is measured between two written lines."""

    path: Path
    accelerator: Any
    bar: Any
    log_every: int
    total_steps: int
    tokens_seen: int = 0
    since: float = field(default_factory=time.time)

    def write(self, record: dict, window: list[dict], force: bool) -> None:
        self.tokens_seen += sum(int(b["attention_mask"].sum()) for b in window) * self.accelerator.num_processes
        self.bar.update(1)
        if record["step"] % self.log_every == 0 or record["step"] == self.total_steps or force:
            elapsed = time.time() - self.since
            record["tokens_per_s"] = self.tokens_seen / max(elapsed, 1e-9)
            self.tokens_seen, self.since = 0, time.time()
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            if self.accelerator.is_main_process:
                with self.path.open("a") as handle:
                    handle.write(json.dumps(record) + "\n")
            self.accelerator.log(record, step=record["step"])


def fault_injection() -> Callable[[], None]:
    """Test-only hook, called after every micro-batch's backward pass: with ``KDLM_FAULT_KILL_AFTER_MICROBATCHES=N``
    it SIGKILLs this process after N micro-batches (the kill-and-resume test); otherwise it does nothing."""
    kill_after = int(os.environ.get("KDLM_FAULT_KILL_AFTER_MICROBATCHES", "0"))
    done = 0

    def after_microbatch() -> None:
        nonlocal done
        done += 1
        if kill_after and done == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    return after_microbatch


def distill(cfg: Config) -> dict:
    """Train the student as ``cfg`` says; returns the run summary (also written to summary.json).

    Under several processes (torchrun, accelerate launch) accelerate creates the process group here, and this
    function also takes it down, in an order that cannot deadlock (see :func:`_teardown`).
    """
    from accelerate import Accelerator

    started = time.time()
    check_paths(cfg)  # a missing data or model path fails here, before any model is loaded or run directory made
    peak_rss_scope = reset_peak_rss()
    owns_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    accelerator = Accelerator(
        mixed_precision=cfg.train.mixed_precision,
        log_with=cfg.train.trackers or None,
        project_dir=cfg.train.output_dir,
    )
    clean = False
    try:
        summary = _run(cfg, accelerator, started, peak_rss_scope)
        clean = True
        return summary
    except BaseException as error:
        # The traceback keeps _run's frame alive, and with it the DDP model: clear the frames' locals (the
        # traceback still prints) so that the model is freed before the process group, as on success.
        traceback.clear_frames(error.__traceback__)
        raise
    finally:
        _teardown(accelerator, owns_group, clean)


def _teardown(accelerator, owns_group: bool, clean: bool) -> None:
    """Finish trackers, free the prepared model/optimizer/loader, then destroy the process group if kdlm made it.

    Why this order: gloo joins its worker threads when the process group object is destroyed, and a worker may
    still need the GIL to release the tensors of its last collective. ``accelerator.end_training()`` used to
    unregister the group while the DDP model still held it, so the group died later inside the DDP reducer's
    destructor, which runs holding the GIL: the main thread waited for the worker, the worker for the GIL (the
    hang at exit seen under CPU load). Here every process first passes a barrier (all collectives done), the DDP
    model is freed while the group is still registered, and the group is then destroyed from Python, which
    releases the GIL while gloo joins its threads. A group created by the caller is left alone. ``clean`` is
    False after an error: no barrier then (the other processes may never reach it).
    """
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.free_memory()  # accelerate's own references to the prepared objects; runs gc
    if owns_group and torch.distributed.is_initialized():
        from accelerate.state import AcceleratorState, GradientState

        if clean:
            accelerator.wait_for_everyone()
        torch.distributed.destroy_process_group()
        # accelerate's singletons describe the group just destroyed: a later distill() in this process builds anew.
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def _run(cfg: Config, accelerator, started: float, peak_rss_scope: str) -> dict:
    """Steps 1-8 of the module docstring on a ready ``accelerator``; its locals die on return (see _teardown)."""
    run_dir, resume_from = _start_run(cfg, accelerator)  # 1.
    models, teacher, teacher_cache = _load_models(cfg, accelerator)  # 2.
    tokenizer, vocab_size = models.tokenizer, models.vocab_size  # the student's
    teacher_tokenizer = models.teacher_tokenizer  # objective.cross_tokenizer only: the teacher has its own
    data = _load_data(cfg, accelerator, tokenizer, teacher, teacher_cache, vocab_size, teacher_tokenizer)  # 3.
    objective = make_objective(cfg.objective, teacher, vocab_size, tokenizer=tokenizer,  # 4.
                               max_length=cfg.data.max_length, seed=cfg.train.seed, run_dir=str(run_dir),
                               batch_size=cfg.train.batch_size, cache=teacher_cache, teacher_tokenizer=teacher_tokenizer,
                               teacher_vocab_size=models.teacher_vocab_size)
    training = _prepare_training(cfg, accelerator, models.student, data, tokenizer.pad_token_id,  # 5.
                                 None if teacher_tokenizer is None else teacher_tokenizer.pad_token_id, teacher)
    state = _resume(resume_from, accelerator, training, data.mixer, run_dir, cfg, objective)  # 6.
    summary: dict = {"data": data.counts, "total_steps": training.total_steps}
    if sharding.is_sharded(training.student):  # what each process holds of the models (process 0's figures)
        summary["sharding"] = sharding.memory_report(training.student, teacher)
    evaluate = partial(  # across tokenizers the held-out KL is not defined token by token: student metrics only
        _evaluate, cfg=cfg, teacher=teacher if teacher_tokenizer is None else None, tokenizer=tokenizer,
        vocab_size=vocab_size,
        eval_items=data.eval_items, eval_examples=data.eval_examples, run_dir=run_dir, accelerator=accelerator,
    )
    if cfg.eval.enabled and state.step == 0 and data.eval_items:
        summary["before"] = evaluate(training.student_lm, tag="before")
    _step_loop(cfg, accelerator, run_dir, objective, training, state, data, evaluate, fault_injection(),  # 7.
               teacher_cache)
    return _finish(cfg, accelerator, run_dir, training.student_lm, tokenizer, data, evaluate, summary, started,  # 8.
                   peak_rss_scope)


def _start_run(cfg: Config, accelerator) -> tuple[Path, Optional[Path]]:
    """1. Run directory (refused or moved aside), logging, resolved config, trackers, seed; the checkpoint to
    resume from."""
    from accelerate.utils import broadcast_object_list, set_seed

    run_dir = Path(cfg.train.output_dir)
    # Process 0 alone looks at the directory (refuse, or move the old run aside); every process then raises the same
    # error, before anything is written or any model is loaded.
    refusal: list[Optional[str]] = [None]
    backup: Optional[Path] = None
    if accelerator.is_main_process:
        try:
            backup = claim_run_dir(run_dir, cfg.train.resume, cfg.train.overwrite)
            run_dir.mkdir(parents=True, exist_ok=True)
        except RunDirError as error:
            refusal[0] = str(error)
    broadcast_object_list(refusal, from_process=0)
    if refusal[0] is not None:
        raise RunDirError(refusal[0])
    # kdlm's log lines on stderr and, on the main process, in train.log; other processes only warn.
    setup_logging(run_dir / "train.log" if accelerator.is_main_process else None,
                  level=logging.INFO if accelerator.is_main_process else logging.WARNING)
    if accelerator.is_main_process and backup is not None:
        log.warning("train.overwrite: the earlier run in %s was moved to %s", run_dir, backup)
    resume_from = None
    if cfg.train.resume:
        # Process 0 verifies the checkpoints' files (sizes, sha256) and every process resumes from its choice.
        found: list = [None]
        if accelerator.is_main_process:
            try:
                found[0] = latest_intact_checkpoint(run_dir)
            except CheckpointError as error:
                found[0] = error
        broadcast_object_list(found, from_process=0)
        if isinstance(found[0], CheckpointError):
            raise CheckpointError(str(found[0]))
        if found[0] is None:
            raise CheckpointError(f"--resume: no complete checkpoint in {run_dir} (set train.save_every to write some)")
        resume_from = Path(found[0])
    if accelerator.is_main_process:
        save_resolved(cfg, run_dir / "config.yaml")
    if cfg.train.trackers:
        # Trackers such as tensorboard take flat scalar hyper-parameters: "train.lr" -> 3e-4.
        flat = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flatten(to_dict(cfg)).items()}
        accelerator.init_trackers(run_dir.name or "kdlm", config=flat)
    set_seed(cfg.train.seed)
    return run_dir, resume_from


def _load_models(cfg: Config, accelerator):
    """2. Teacher, student and tokenizer (the tokenizer check happens inside: a mismatch is an error, padded rows
    are sliced later). With a teacher cache (cache.dir) or a served teacher (teacher.server) the teacher never runs
    here: the loss reads its signal from disk or from the server."""
    served = None
    if cfg.teacher.server is not None:  # a served teacher is reached and checked before any model is loaded
        from kdlm.teacher_server import connect_for_run

        served = connect_for_run(cfg)
    teacher_needed = cfg.cache.dir is None and served is None
    shards = None
    if teacher_needed and cfg.train.parallel == "fsdp" and accelerator.num_processes > 1:
        # never whole in one process: each reads its shard from the files (None: not possible, loaded whole below)
        shards = sharding.load_teacher_into_shards(cfg, accelerator.device)
    models = load_models(cfg, teacher_needed=teacher_needed, teacher=shards[0] if shards else None,
                         teacher_weights=shards[1] if shards else None)
    teacher = models.teacher
    if teacher is not None and not sharding.is_sharded(teacher):
        teacher = teacher.to(accelerator.device)
    teacher_cache = served  # a kdlm.losses.sparse.TeacherSignal: the server's, or the cache's below
    if cfg.cache.dir is not None:
        from kdlm.cache import open_for_run

        # The teacher's tokenizer (objective.cross_tokenizer: its own); refuses a cache built for another run.
        teacher_cache = open_for_run(cfg, models.teacher_tokenizer or models.tokenizer,
                                     models.teacher_vocab_size or models.vocab_size,
                                     served.fingerprint if served is not None else None)
        log.info("teacher: cached signal in %s (%s), the teacher is not run", cfg.cache.dir, teacher_cache.signal)
    return models, teacher, teacher_cache


def _load_data(cfg: Config, accelerator, tokenizer, teacher, teacher_cache, vocab_size: int,
               teacher_tokenizer=None) -> _Data:
    """3. Read, let the teacher write responses where the data has none (cached), tokenise with masking; the
    domain mixer when data.mixing asks for one. With ``teacher_tokenizer`` (objective.cross_tokenizer) every example
    is tokenised by both, each with its own chat template, and the response aligned (kdlm.data.align)."""
    train_examples, eval_examples, has_responses = load_splits(cfg.data, cfg.train.seed)
    if not has_responses:
        _teacher_responses(cfg, accelerator, teacher, teacher_tokenizer or tokenizer, train_examples, "train")
        _teacher_responses(cfg, accelerator, teacher, teacher_tokenizer or tokenizer, eval_examples, "eval")
    tok = partial(
        tokenize_examples,
        tokenizer=tokenizer,
        max_prompt_length=cfg.data.max_prompt_length,
        max_length=cfg.data.max_length,
        system_prompt=cfg.data.system_prompt,
    )
    alignment: dict = {}
    if teacher_tokenizer is not None:
        tok = partial(tokenize_pairs, student_tokenizer=tokenizer, teacher_tokenizer=teacher_tokenizer,
                      max_prompt_length=cfg.data.max_prompt_length, max_length=cfg.data.max_length,
                      system_prompt=cfg.data.system_prompt)
        (train_items, train_counts, train_align), (eval_items, eval_counts, eval_align) = tok(train_examples), tok(eval_examples)
        for name, stats in (("train data", train_align), ("eval data", eval_align)):
            log.info(stats.summary(name))
        alignment = {"train": train_align.as_dict(), "eval": eval_align.as_dict()}
    else:
        train_items, train_counts = tok(train_examples)
        eval_items, eval_counts = tok(eval_examples)
    log.info(train_counts.summary("train data"))
    log.info(eval_counts.summary("eval data"))
    if not train_items:
        raise DataError(f"{cfg.data.train}: no training example left ({train_counts.summary('train data')})")
    if teacher_cache is not None:
        teacher_cache.check_items(train_items)
    mixer = None
    if cfg.data.mixing.strategy != "none":
        validation_items = None
        if cfg.data.mixing.validation is not None:
            validation_examples, val_has_responses = read_examples(cfg.data.mixing.validation, cfg.data)
            if not val_has_responses:
                _teacher_responses(cfg, accelerator, teacher, tokenizer, validation_examples, "mixing-validation")
            validation_items, _ = tok(validation_examples)
        # Replaces the epoch order: each optimizer step's examples are drawn by domain weights.
        mixer = DomainMixer(cfg, train_items, validation_items, teacher=teacher, vocab_size=vocab_size,
                            pad_id=tokenizer.pad_token_id, num_processes=accelerator.num_processes,
                            process_index=accelerator.process_index)
    counts = {"train": vars(train_counts), "eval": vars(eval_counts), **({"alignment": alignment} if alignment else {})}
    return _Data(train_items, eval_items, eval_examples, counts, mixer)


def _teacher_responses(cfg: Config, accelerator, teacher, tokenizer, examples: list, name: str) -> None:
    """The teacher's responses for data without them (cached on disk). A sharded teacher needs every process in each
    of its forwards, so all generate together, each its share of the prompts; otherwise one process generates and
    caches while the others wait, then read the cache."""
    if sharding.is_sharded(teacher):
        with sharding.root_gathered(teacher):  # generate calls the HF model, whose tied output layer is the embedding
            fill_teacher_responses(cfg, teacher, tokenizer, examples, name,
                                   process=(accelerator.process_index, accelerator.num_processes))
        return
    with accelerator.main_process_first():
        fill_teacher_responses(cfg, teacher, tokenizer, examples, name)


def _prepare_training(cfg: Config, accelerator, student_lm, data: _Data, pad_id: int,
                      teacher_pad_id: Optional[int] = None, teacher=None) -> _Training:
    """5. The DecoderOnly student, data loader, AdamW and the cosine schedule, through accelerate.prepare.
    ``teacher_pad_id``: batches carry the teacher's own sequences too (objective.cross_tokenizer). With
    train.parallel fsdp and several processes, the student is sharded in place here (kdlm.train.sharding), the
    teacher too unless step 2 loaded it straight into its shards, and accelerate prepares the rest."""
    from transformers import get_cosine_schedule_with_warmup

    student = DecoderOnly(student_lm)
    sharded = cfg.train.parallel == "fsdp" and accelerator.num_processes > 1
    if sharded:
        sharding.shard_student(student, cfg.train, accelerator.device)
        if teacher is not None and not sharding.is_sharded(teacher):  # not loaded straight into its shards
            sharding.shard_teacher(teacher, cfg.train, accelerator.device)
    sampler = EpochSampler(len(data.train_items), cfg.train.seed)
    loader = DataLoader(
        data.train_items, batch_size=cfg.train.batch_size, sampler=sampler,
        collate_fn=partial(collate, pad_id=pad_id) if teacher_pad_id is None
        else partial(collate_pairs, pad_id=pad_id, teacher_pad_id=teacher_pad_id),
        # Its own generator: creating an iterator would otherwise draw from the global RNG right after a resume
        # restored it, shifting every later dropout mask (resume would not be exact for models with dropout).
        generator=torch.Generator(),
    )
    trainable = [p for p in student.parameters() if p.requires_grad]  # LoRA: the adapters only
    optimizer = torch.optim.AdamW(trainable, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    if sharded:  # already distributed: accelerate must not wrap it in DDP as well
        optimizer, loader = accelerator.prepare(optimizer, loader)
    else:
        student, optimizer, loader = accelerator.prepare(student, optimizer, loader)
    sharding.release_freed_memory()  # the full models freed by sharding (and pruning's copy) leave the process
    steps_per_epoch = max(1, len(loader) // cfg.train.grad_accum)
    if data.mixer is not None:
        steps_per_epoch = max(1, len(data.mixer.train_items) // data.mixer.sampler.per_step)
    total_steps = cfg.train.max_steps or math.ceil(cfg.train.epochs * steps_per_epoch)
    # The scheduler is stepped by hand once per optimizer step (not prepared: accelerate would step it per process).
    scheduler = get_cosine_schedule_with_warmup(optimizer, round(cfg.train.warmup_ratio * total_steps), total_steps)
    return _Training(student, accelerator.unwrap_model(student).lm, optimizer, scheduler, loader, sampler, total_steps)


def _resume(resume_from: Optional[Path], accelerator, training: _Training, mixer, run_dir: Path, cfg: Config,
            objective) -> TrainState:
    """6. A fresh state, or the checkpoint's (weights, optimizer, scheduler, RNG, data position, domain sampler,
    the objective's state)."""
    if resume_from is None:
        return TrainState()
    state = load_checkpoint(resume_from, accelerator, training.student_lm, training.optimizer, training.scheduler,
                            parallel=cfg.train.parallel)
    objective.load_state_dict(load_objective_state(resume_from, accelerator.process_index))
    if accelerator.is_main_process:
        _truncate_metrics(run_dir / "metrics.jsonl", state.step)
    if mixer is not None:
        if state.mixing is None:
            raise CheckpointError(f"{resume_from}: no domain-sampler state, but data.mixing.strategy is {cfg.data.mixing.strategy}")
        mixer.load_state_dict(state.mixing)
    return state


def _step_loop(cfg: Config, accelerator, run_dir: Path, objective, t: _Training, state: TrainState, data: _Data,
           evaluate, after_microbatch: Callable[[], None], teacher_signal=None) -> None:
    """7. The step loop: draw the step's micro-batches, let the objective prepare them, accumulate, guard, step, log,
    evaluate and save. A served teacher (``teacher_signal`` with ``prefetch``) is asked for the coming micro-batches'
    signals while each step trains."""
    from accelerate.utils import broadcast

    batches = _batches(accelerator, t.loader, t.sampler, state)
    if hasattr(teacher_signal, "prefetch"):
        batches = teacher_signal.prefetch(batches, state)
    bar = tqdm(total=t.total_steps, initial=state.step, desc="distill", unit="step",
               disable=not (cfg.train.progress and accelerator.is_main_process), dynamic_ncols=True)
    logger = _Logger(run_dir / "metrics.jsonl", accelerator, bar, cfg.train.log_every, t.total_steps)
    nonfinite_in_a_row = 0
    t.student.train()
    mixing_stats: dict[int, dict[str, float]] = {}

    def draw(step: int) -> Optional[list[dict]]:
        """Step ``step``'s micro-batches (None past the last step). The objective calls it, for the current step
        and possibly a few steps ahead (GKD's sampling.steps_per_generation)."""
        if step >= t.total_steps:
            return None
        if data.mixer is None:
            return [next(batches) for _ in range(cfg.train.grad_accum)]
        # DDK & co.: the step's examples by domain weights (re-weighted every interval)
        with full_parameters(t.student_lm):  # its perplexities call the bare model (fsdp: gathered)
            window, mixing_stats[step] = data.mixer.window(step, t.student_lm, accelerator.device,
                                                           partial(broadcast, from_process=0))
        return window

    while state.step < t.total_steps:
        # On-policy methods sample responses now (GKD, DPKD sequence); the others return the window as drawn.
        window, policy_stats = objective.prepare_window(draw, step=state.step, student_lm=t.student_lm,
                                                        process_index=accelerator.process_index)
        # The denominator of the loss: response tokens (or the objective's units, e.g. DPKD's pairs) of the whole
        # optimizer step, over every process.
        units = int(accelerator.reduce(torch.tensor(sum(objective.units(b) for b in window), device=accelerator.device), "sum"))
        totals, names = _accumulate(accelerator, objective, t.student, window, units, after_microbatch)
        finite, grad_norm = _optimizer_step(cfg, accelerator, t, totals)
        nonfinite_in_a_row = 0 if finite else nonfinite_in_a_row + 1
        if not finite:
            log.warning("step %d: non-finite loss or gradient (loss %s, grad norm %s): step skipped, no weight changed "
                        "(%d in a row)", state.step + 1, float(totals[0]), grad_norm, nonfinite_in_a_row)
        t.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        record = {"step": state.step, "epoch": state.epoch, "loss": float(totals[0]) / max(units, 1)}
        record.update({k: float(v) / max(units, 1) for k, v in zip(names, totals[1:].tolist())})
        record.update({"lr": t.scheduler.get_last_lr()[0], "grad_norm": grad_norm, "response_tokens": units})
        if not finite:
            record["skipped_nonfinite"] = 1
        record.update(mixing_stats.pop(state.step - 1, {}))
        record.update(policy_stats)
        logger.write(record, window, force=not finite)
        if nonfinite_in_a_row >= cfg.train.max_nonfinite_steps:
            _stop_nonfinite(run_dir, state.step, nonfinite_in_a_row)
        if cfg.train.eval_every and state.step % cfg.train.eval_every == 0 and state.step < t.total_steps and data.eval_items:
            evaluate(t.student_lm, tag=f"step{state.step}", samples=False)
        if cfg.train.save_every and state.step % cfg.train.save_every == 0:
            state.mixing = data.mixer.state_dict() if data.mixer is not None else None
            save_checkpoint(run_dir, state, accelerator, t.student_lm, t.optimizer, t.scheduler, cfg.train.save_total_limit,
                            objective_state=objective.state_dict())
    batches.close()  # a served teacher's requests for micro-batches past the last step are cancelled
    bar.close()


def _accumulate(accelerator, objective, student, window: list[dict], units: int,
                after_microbatch: Callable[[], None]) -> tuple[torch.Tensor, list[str]]:
    """Forward and backward over the step's micro-batches (gradients synchronised on the last one only); returns
    the loss and metric sums, summed over every process, and the metric names."""
    step_sums: dict[str, float] = {}
    loss_sum = 0.0
    for index, batch in enumerate(window):
        last = index == len(window) - 1
        with (nullcontext() if last else accelerator.no_sync(student)), accelerator.autocast():
            out = objective(student, batch)
            sharding.release_teachers()  # fsdp: a tied teacher's output layer, gathered since its forward
            # DDP and FSDP2 average gradients over processes, hence the factor num_processes.
            loss = out.loss_sum * accelerator.num_processes / max(units, 1)
        accelerator.backward(loss)
        after_microbatch()
        loss_sum += float(out.loss_sum.detach())
        for key, value in out.metrics.items():
            step_sums[key] = step_sums.get(key, 0.0) + value
    totals = accelerator.reduce(torch.tensor([loss_sum, *step_sums.values()], device=accelerator.device), "sum")
    return totals, list(step_sums)


def _optimizer_step(cfg: Config, accelerator, t: _Training, totals: torch.Tensor) -> tuple[bool, float]:
    """Clip and step, unless the step is non-finite. The global gradient norm (all processes, after DDP's
    all-reduce) and the global loss decide, so every process skips the same steps. A skipped step consumes its data
    but changes no weight."""
    if sharding.is_sharded(t.student):
        grad_norm = sharding.clip_grad_norm(t.student.parameters(), cfg.train.max_grad_norm or math.inf)
    else:
        grad_norm = float(accelerator.clip_grad_norm_(t.student.parameters(), cfg.train.max_grad_norm or math.inf))
    finite = math.isfinite(grad_norm) and math.isfinite(float(totals[0]))
    if finite:
        t.optimizer.step()
        t.scheduler.step()
    return finite, grad_norm


def _stop_nonfinite(run_dir: Path, step: int, in_a_row: int) -> None:
    last_good = latest_checkpoint(run_dir)
    raise TrainingError(
        f"{in_a_row} optimizer steps in a row had a non-finite loss or gradient (last: step "
        f"{step}); stopped. Weights are those of the last finite step; the newest complete checkpoint is "
        f"{last_good or 'none (set train.save_every)'}. Lower train.lr, set train.max_grad_norm, use "
        "train.mixed_precision bf16 instead of fp16, or check the data."
    )


def _evaluate(student_lm, **kwargs) -> dict:
    """Held-out evaluation (kdlm.eval.heldout) of the student; fsdp: the student gathered meanwhile (its samples call
    the bare model), the teacher left sharded (it runs through its backbone and OutputHead only, the training
    forward), and run by every process on the same batches (the sharded models' hooks communicate, measured:
    process 0 alone ran into a collective of the training step)."""
    try:
        with full_parameters(student_lm):
            return evaluate_and_report(student_lm, every_process=sharding.is_sharded(student_lm), **kwargs)
    finally:
        sharding.release_teachers()  # a tied teacher's embedding, gathered since its last forward


def _finish(cfg: Config, accelerator, run_dir: Path, student_lm, tokenizer, data: _Data, evaluate, summary: dict,
            started: float, peak_rss_scope: str) -> dict:
    """8. Final student (LoRA: the adapter and the merged model), after-evaluation, mixing report, summary.json."""
    weights = sharding.full_state_dict(student_lm)  # fsdp: every process takes part in the gather; else None
    if accelerator.is_main_process:
        save_student(student_lm, tokenizer, run_dir / "final", state_dict=weights)
    if cfg.eval.enabled and data.eval_items:
        summary["after"] = evaluate(student_lm, tag="after")
    if data.mixer is not None and accelerator.is_main_process:
        summary["mixing"] = write_mixing_report(data.mixer.history, run_dir)
    summary["wall_s"] = time.time() - started
    summary["peak_rss_gb"], summary["peak_rss_scope"] = peak_rss_gb(), peak_rss_scope
    if accelerator.is_main_process:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        if "before" in summary and "after" in summary:
            comparison = format_comparison(summary["before"], summary["after"])
            (run_dir / "comparison.md").write_text(comparison + "\n")
            print(comparison, flush=True)
        log.info("done in %.0f s, peak memory %.2f GB; student saved to %s", summary["wall_s"], summary["peak_rss_gb"], run_dir / "final")
    return summary
