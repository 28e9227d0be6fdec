"""Domain mixing of training batches (DDK, Liu et al., NeurIPS 2024, arXiv 2407.16154) for the training loop.

:class:`DomainMixer` owns the per-domain validation sets, the teacher's per-domain perplexities (measured once
and cached on disk), the student's (re-measured every ``data.mixing.interval`` optimizer steps) and the
:class:`kdlm.data.DomainBatchSampler` that draws each optimizer step's examples by domain. The maths are in
:mod:`kdlm.data.ddk`; this module only wires them to models, processes and checkpoints.

Every process computes the same perplexities over the whole validation set, and the weights are then taken
from process 0 (broadcast), so all ranks follow one bit-identical domain schedule; each step's examples are
split between processes and micro-batches with no example twice in one step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from kdlm.config import Config
from kdlm.data import collate
from kdlm.data.ddk import (
    DomainBatchSampler,
    DomainStats,
    carve_validation,
    initial_weights,
    next_weights,
    split_step,
)
from kdlm.data.format import Tokenized
from kdlm.errors import DataError
from kdlm.eval.teacher_forced import teacher_forced_metrics
from kdlm.models import cache_root

log = logging.getLogger(__name__)
_NEEDS_PERPLEXITY = ("ddk", "ddk_no_smoothing")


def domain_perplexities(lm: nn.Module, items: list[Tokenized], domains: tuple[str, ...], *, vocab_size: int,
                        pad_id: int, batch_size: int = 16) -> torch.Tensor:
    """Per-domain perplexity exp(token-weighted mean cross-entropy on the responses), float64, in ``domains`` order."""
    result = teacher_forced_metrics(lm, None, items, vocab_size=vocab_size, pad_id=pad_id, batch_size=batch_size)
    missing = [name for name in domains if f"domain/{name}" not in result]
    if missing:
        raise DataError(f"data.mixing: no validation tokens for domain(s) {missing}")
    return torch.tensor([math.exp(result[f"domain/{name}"]["student_ce"]) for name in domains], dtype=torch.float64)


class DomainMixer:
    """Draws the training batches of every optimizer step by domain weights that follow the student–teacher gap."""

    def __init__(
        self,
        cfg: Config,
        train_items: list[Tokenized],
        validation_items: Optional[list[Tokenized]],
        *,
        teacher: Optional[nn.Module],
        vocab_size: int,
        pad_id: int,
        num_processes: int,
        process_index: int,
    ):
        mixing = cfg.data.mixing
        self.strategy, self.interval, self.alpha = mixing.strategy, mixing.interval, mixing.alpha
        self.cfg, self.teacher, self.vocab_size, self.pad_id = cfg, teacher, vocab_size, pad_id
        self.num_processes, self.process_index = num_processes, process_index
        self.grad_accum, self.batch_size = cfg.train.grad_accum, cfg.train.batch_size
        domains = sorted({item.domain for item in train_items})
        if len(domains) < 2:
            raise DataError(
                f"data.mixing.strategy={self.strategy} needs at least two domains in {cfg.data.train}, found "
                f"{domains}: give every record a '{cfg.data.domain_field}' field (data.domain_field) or use strategy none"
            )
        if validation_items is None:
            try:
                train_idx, val_idx = carve_validation(
                    [item.domain for item in train_items], per_domain=mixing.val_per_domain, seed=cfg.train.seed
                )
            except ValueError as error:
                raise DataError(f"data.mixing: carving validation sets from {cfg.data.train}: {error}") from error
            validation_items = [train_items[i] for name in sorted(val_idx) for i in val_idx[name]]
            train_items = [train_items[i] for i in train_idx]
            log.info("data.mixing: %d validation examples carved from the training data (up to %d per domain)",
                     len(validation_items), mixing.val_per_domain)
        else:  # a given validation set: its first val_per_domain examples of each domain
            kept: dict[str, int] = {}
            capped = []
            for item in validation_items:
                kept[item.domain] = kept.get(item.domain, 0) + 1
                if kept[item.domain] <= mixing.val_per_domain:
                    capped.append(item)
            validation_items = capped
        self.train_items, self.validation_items = train_items, validation_items
        per_step = self.batch_size * self.grad_accum * num_processes
        self.sampler = DomainBatchSampler.from_items(train_items, per_step, seed=cfg.train.seed)
        self.domains = self.sampler.domains
        missing = sorted(set(self.domains) - {item.domain for item in validation_items})
        if missing:
            raise DataError(f"data.mixing.validation ({mixing.validation}): no examples for training domain(s) {missing}")
        self.teacher_ppl: Optional[torch.Tensor] = None
        self.student_ppl: Optional[torch.Tensor] = None
        self.history: list[dict[str, Any]] = []

    # ----------------------------------------------------------------------------------------------- perplexities
    def _teacher_perplexities(self) -> torch.Tensor:
        """Measured once per (teacher weights, validation set) and cached, since the teacher never changes during a
        run; keyed by the weights' fingerprint, not the path, so a teacher retrained in place is measured again."""
        from kdlm.models import teacher_fingerprint

        identity = {
            "teacher": [teacher_fingerprint(self.cfg), self.cfg.teacher.dtype],
            "validation": hashlib.sha256(
                json.dumps([[item.domain, item.input_ids, item.labels] for item in self.validation_items]).encode()
            ).hexdigest(),
        }
        key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]
        path = cache_root(self.cfg.data.cache_dir) / "ddk" / f"teacher-ppl-{key}.json"
        if path.is_file():
            cached = json.loads(path.read_text())
            if cached.get("domains") == list(self.domains):
                log.info("data.mixing: teacher perplexities cached in %s", path)
                return torch.tensor(cached["ppl"], dtype=torch.float64)
        if self.teacher is None:
            raise DataError("data.mixing.strategy ddk needs the teacher's perplexities, but no teacher is loaded")
        ppl = domain_perplexities(self.teacher, self.validation_items, self.domains,
                                  vocab_size=self.vocab_size, pad_id=self.pad_id)
        if self.process_index == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            with os.fdopen(fd, "w") as handle:
                json.dump({"domains": list(self.domains), "ppl": ppl.tolist(), "identity": identity}, handle)
            os.replace(tmp, path)  # atomic: a killed run leaves no half-written cache
        return ppl

    def _update(self, step: int, student_lm: nn.Module, broadcast) -> dict[str, float]:
        """Re-measure (when the strategy needs it) and set the weights for the next ``interval`` steps."""
        sizes = list(self.sampler.domain_sizes)
        if self.strategy in _NEEDS_PERPLEXITY:
            if self.teacher_ppl is None:
                self.teacher_ppl = self._teacher_perplexities()
            self.student_ppl = domain_perplexities(student_lm, self.validation_items, self.domains,
                                                   vocab_size=self.vocab_size, pad_id=self.pad_id)
        if step == 0:
            weights = initial_weights(self.strategy, self.student_ppl, self.teacher_ppl, sizes)
        else:
            weights = next_weights(self.strategy, self.sampler.weights, self.student_ppl, self.teacher_ppl,
                                   sizes, alpha=self.alpha)
        # One schedule for all processes: process 0's weights, bit for bit.
        weights = broadcast(weights.to(torch.float64))
        self.sampler.set_weights(weights.cpu())
        stats: dict[str, float] = {}
        if self.student_ppl is not None:
            stats = DomainStats(list(self.domains), self.student_ppl.tolist(), self.teacher_ppl.tolist(),
                                self.sampler.weights.tolist()).as_log_dict()
        else:
            stats = {f"ddk/weight/{name}": float(w) for name, w in zip(self.domains, self.sampler.weights.tolist())}
        self.history.append({"step": step, **stats})
        log.info("data.mixing (%s) at step %d: %s", self.strategy, step,
                 ", ".join(f"{n} {w:.3f}" for n, w in zip(self.domains, self.sampler.weights.tolist())))
        return stats

    # ----------------------------------------------------------------------------------------------- batches
    def window(self, step: int, student_lm: nn.Module, device, broadcast) -> tuple[list[dict], dict[str, float]]:
        """This process's micro-batches of optimizer step ``step``, and the mixing stats when weights changed."""
        stats: dict[str, float] = {}
        if step % self.interval == 0:
            stats = self._update(step, student_lm, broadcast)
        indices = self.sampler.draw_step(step)
        micro = split_step(indices, self.num_processes, self.process_index, self.grad_accum)
        batches = [collate([self.train_items[i] for i in part], self.pad_id) for part in micro]
        return [{k: v.to(device) for k, v in batch.items()} for batch in batches], stats

    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict(), "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.history = list(state.get("history", []))


def write_mixing_report(history: list[dict[str, Any]], run_dir: Path) -> dict[str, Any]:
    """Write every weight update to ``mixing.jsonl`` and plot weights (and student/teacher perplexity ratios when
    measured) over training steps to ``mixing.png``. Returns a short summary for ``summary.json``."""
    run_dir = Path(run_dir)
    with (run_dir / "mixing.jsonl").open("w") as handle:
        for record in history:
            handle.write(json.dumps(record) + "\n")
    if not history:
        return {"updates": 0}
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    steps = [record["step"] for record in history]
    domains = sorted(key.split("/", 2)[2] for key in history[-1] if key.startswith("ddk/weight/"))
    has_ratio = all(f"ddk/ratio/{name}" in history[-1] for name in domains)
    fig, axes = plt.subplots(1, 2 if has_ratio else 1, figsize=(11 if has_ratio else 6, 4), squeeze=False)
    for name in domains:
        axes[0][0].plot(steps, [r[f"ddk/weight/{name}"] for r in history], marker="o", label=name)
        if has_ratio:
            axes[0][1].plot(steps, [r[f"ddk/ratio/{name}"] for r in history], marker="o", label=name)
    axes[0][0].set(title="domain sampling weight", xlabel="optimizer step", ylabel="weight")
    if has_ratio:
        axes[0][1].set(title="student / teacher perplexity", xlabel="optimizer step", ylabel="ratio (log scale)",
                       yscale="log")  # ratios span orders of magnitude early in training
    axes[0][-1].legend(fontsize="small", loc="best")
    fig.tight_layout()
    fig.savefig(run_dir / "mixing.png", dpi=110)
    plt.close(fig)
    final = {name: history[-1][f"ddk/weight/{name}"] for name in domains}
    return {"updates": len(history), "final_weights": final, "plot": "mixing.png"}
