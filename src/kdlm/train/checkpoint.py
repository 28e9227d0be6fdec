"""Atomic checkpoints and exact resume.

A checkpoint folder ``checkpoint-0000100`` holds the student (safetensors, loadable with ``from_pretrained``),
the optimizer state, the scheduler state, every process's RNG state and the data position. It is written under a
temporary name, ``manifest.json`` is written last, and only then is the folder renamed: a folder without a
manifest is a torn checkpoint and is never loaded.

The manifest (format 2) records every file's size in bytes and sha256. ``--resume`` verifies them and skips a
checkpoint whose file is missing, has another size or another hash (damaged on disk or by a copy) with a warning
naming the file, resuming from the newest intact one. A format-1 manifest (kdlm before checksums) lists names only:
it is accepted with a warning that its files cannot be verified.
"""

from __future__ import annotations

import json
import logging
import pickle
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from kdlm.cache import file_sha256
from kdlm.errors import CheckpointError
from kdlm.train.sharding import is_sharded, load_sharded, save_sharded

log = logging.getLogger(__name__)
FORMAT_VERSION = 2
"""2: ``files`` maps each file to its size and sha256; 1: ``files`` lists names only (still loadable)."""
PREFIX = "checkpoint-"
SHARDED = "sharded"
"""train.parallel fsdp: the folder of the torch.distributed.checkpoint files (student weights and AdamW state)."""


@dataclass
class TrainState:
    """Where training stands: optimizer steps done and the position in the data stream."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    """Micro-batches of the current epoch already consumed (by this process)."""
    mixing: Optional[dict] = None
    """The domain sampler's state (data.mixing), plain JSON; None with the plain epoch order."""


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            state[f"torch_cuda_{index}"] = cuda_state
    return state


def _python_rng() -> dict:
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }


def save_checkpoint(run_dir: Path, state: TrainState, accelerator, student_lm, optimizer, scheduler, keep: int,
                    objective_state: Optional[dict] = None) -> Path:
    """Write checkpoint ``state.step`` atomically; every process calls this (each saves its own RNG state and
    ``objective_state``, the objective's :meth:`state_dict`, when not empty)."""
    final = run_dir / f"{PREFIX}{state.step:07d}"
    tmp = run_dir / f".{PREFIX}{state.step:07d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    rank = accelerator.process_index
    save_file(_rng_state(), tmp / f"rng-rank{rank}.safetensors")
    (tmp / f"rng-rank{rank}.json").write_text(json.dumps(_python_rng()))
    if objective_state:  # e.g. GKD's batches sampled ahead (sampling.steps_per_generation)
        torch.save(objective_state, tmp / f"objective-rank{rank}.pt")
    sharded = is_sharded(student_lm)
    if sharded:  # fsdp: each process writes its shards of the weights and of AdamW's state
        save_sharded(tmp / SHARDED, student_lm, optimizer)
    if accelerator.is_main_process:
        from kdlm.models import is_peft_model

        if not sharded and is_peft_model(student_lm):  # LoRA: the adapter only (the base is rebuilt from the config)
            student_lm.save_pretrained(tmp / "student", safe_serialization=True, save_embedding_layers=False)
        elif not sharded:
            student_lm.save_pretrained(tmp / "student", safe_serialization=True)
        if not sharded:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))
        (tmp / "state.json").write_text(json.dumps(asdict(state)))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        manifest = {
            "format": FORMAT_VERSION,
            "step": state.step,
            "num_processes": accelerator.num_processes,
            "parallel": "fsdp" if sharded else "ddp",
            "files": {
                str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
                for p in sorted(tmp.rglob("*")) if p.is_file()
            },
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))  # last: marks the folder complete
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        complete = sorted(complete_checkpoints(run_dir))
        for old in complete[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders that have their manifest, oldest first; torn ones are reported and skipped."""
    found = []
    for path in sorted(run_dir.glob(f"{PREFIX}*")):
        if (path / "manifest.json").is_file():
            found.append(path)
        else:
            log.warning("skipping torn checkpoint %s (no manifest.json: it was interrupted while being written)", path)
    return found


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest checkpoint with a manifest (its files not verified: see :func:`latest_intact_checkpoint`)."""
    complete = complete_checkpoints(run_dir)
    return complete[-1] if complete else None


def checkpoint_damage(path: Path) -> Optional[str]:
    """What is wrong with the files of checkpoint ``path`` against its manifest, naming the file; None if intact.

    Sizes are compared first (cheap, catches truncation), then every file's sha256 (catches changed bytes).
    """
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"{path / 'manifest.json'} is unreadable ({error})"
    if manifest.get("format") == 1:
        log.warning("%s was written before kdlm recorded checksums (checkpoint format 1): its files cannot be "
                    "verified", path)
        return None
    for name, expected in files.items():
        size = (path / name).stat().st_size if (path / name).is_file() else None
        if size != expected["bytes"]:
            found = "missing" if size is None else f"{size} bytes"
            return f"{path / name} is {found}, the manifest says {expected['bytes']} bytes"
    for name, expected in files.items():
        if file_sha256(path / name) != expected["sha256"]:
            return f"{path / name} does not match the sha256 in the manifest (its bytes changed)"
    return None


def latest_intact_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint whose files match their manifest; damaged ones are skipped with a warning.

    Raises :class:`CheckpointError` when complete checkpoints exist but every one is damaged.
    """
    complete = complete_checkpoints(run_dir)
    damaged = []
    for path in reversed(complete):
        problem = checkpoint_damage(path)
        if problem is None:
            return path
        log.warning("skipping damaged checkpoint %s: %s", path, problem)
        damaged.append(problem)
    if damaged:
        raise CheckpointError(f"--resume: every checkpoint in {run_dir} is damaged: {'; '.join(damaged)}")
    return None


def load_objective_state(path: Path, rank: int) -> dict:
    """The objective's state saved by process ``rank`` in checkpoint ``path`` (empty when it saved none);
    tensors and plain containers only, like the optimizer state."""
    file = path / f"objective-rank{rank}.pt"
    if not file.is_file():
        return {}
    try:
        return torch.load(file, weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(f"{file}: refused to load: it holds pickled objects other than tensors and plain "
                              f"containers, which kdlm never writes (a tampered or foreign file?). Details: {error}") from error


def load_checkpoint(path: Path, accelerator, student_lm, optimizer, scheduler, parallel: str = "ddp") -> TrainState:
    """Restore weights, optimizer, scheduler, RNG and data position; anything missing is an error.

    ``parallel`` (train.parallel) must be the one the checkpoint was written with: fsdp checkpoints hold sharded
    weights (torch.distributed.checkpoint), ddp ones a plain student folder."""
    manifest = json.loads((path / "manifest.json").read_text())
    if manifest.get("format") not in (1, FORMAT_VERSION):
        raise CheckpointError(f"{path}: checkpoint format {manifest.get('format')} is not 1 or {FORMAT_VERSION}")
    written_with, sharded = manifest.get("parallel", "ddp"), is_sharded(student_lm)
    if written_with != ("fsdp" if sharded else "ddp"):
        raise CheckpointError(f"{path}: written with train.parallel {written_with}, resuming with train.parallel "
                              f"{parallel} on {accelerator.num_processes} process(es); resume with train.parallel "
                              f"{written_with} (fsdp shards need 2 or more processes)")
    if manifest["num_processes"] != accelerator.num_processes:
        # torch.distributed.checkpoint could re-shard fsdp weights and AdamW state for another process count, but
        # the data position (micro-batches consumed per process) and each process's RNG streams cannot follow.
        raise CheckpointError(
            f"{path}: written by {manifest['num_processes']} processes, resuming with {accelerator.num_processes}; "
            "resume with the same number of processes (the data position and RNG streams are per process)"
        )
    rank = accelerator.process_index
    from kdlm.models import is_peft_model

    lora = is_peft_model(student_lm)
    student_file = "student/adapter_model.safetensors" if lora else "student/model.safetensors"
    weight_files = [f"{SHARDED}/.metadata"] if sharded else [student_file, "optimizer.pt"]
    required = [*weight_files, "scheduler.json", "state.json", f"rng-rank{rank}.safetensors", f"rng-rank{rank}.json"]
    missing = [name for name in required if not (path / name).is_file()]
    if missing:
        raise CheckpointError(f"{path}: incomplete checkpoint, missing {missing}; cannot resume exactly from it")
    if sharded:
        load_sharded(path / SHARDED, student_lm, optimizer)
    else:
        _load_weights(path, student_lm, optimizer, student_file, lora)
    scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()))
    rng = load_file(path / f"rng-rank{rank}.safetensors")
    torch.set_rng_state(rng["torch_cpu"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")])
    other = json.loads((path / f"rng-rank{rank}.json").read_text())
    version, internal, gauss = other["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = other["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    state = TrainState(**json.loads((path / "state.json").read_text()))
    log.info("resumed from %s at step %d (epoch %d, batch %d)", path, state.step, state.epoch, state.batches_in_epoch)
    return state


def _load_weights(path: Path, student_lm, optimizer, student_file: str, lora: bool) -> None:
    """ddp checkpoints: the student folder (or the LoRA adapter) and optimizer.pt."""
    weights = load_file(path / student_file)
    if lora:  # the adapter only: every trainable tensor must come from the file, and nothing else may be in it
        from peft import set_peft_model_state_dict

        mismatch = f"{path / student_file}: the adapter does not match the student's LoRA layers (student.lora changed?)"
        trainable = {name for name, param in student_lm.named_parameters() if param.requires_grad}
        try:
            result = set_peft_model_state_dict(student_lm, weights)
        except RuntimeError as error:  # shapes differ, e.g. another student.lora.r
            raise CheckpointError(f"{mismatch}: {error}") from error
        not_loaded = sorted(trainable & set(result.missing_keys))
        if result.unexpected_keys or not_loaded:
            raise CheckpointError(f"{mismatch}: not in the file {not_loaded[:5]}, unknown {list(result.unexpected_keys)[:5]}")
    else:
        result = student_lm.load_state_dict(weights, strict=False)
        tied = {"lm_head.weight"} if getattr(student_lm.config, "tie_word_embeddings", False) else set()
        if result.unexpected_keys or set(result.missing_keys) - tied:
            raise CheckpointError(f"{path}: student weights do not match the model ({result})")
    try:  # weights_only: tensors and plain containers only, never arbitrary pickled objects (code execution)
        optimizer_state = torch.load(path / "optimizer.pt", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path / 'optimizer.pt'}: refused to load: it holds pickled objects other than tensors and plain "
            f"containers, which kdlm never writes (a tampered or foreign file?). Details: {error}"
        ) from error
    optimizer.load_state_dict(optimizer_state)
