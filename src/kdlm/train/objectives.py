"""Training objectives. Each method is a function ``(student, batch) -> StepOutput``; the loop knows nothing else.

An objective returns SUMS over the batch's response tokens; the training loop divides by the number of response
tokens in the whole optimizer step across all processes (so gradient accumulation and data parallelism give the
same loss as one large batch). Logits are computed only at response positions: prompt positions need no
output layer.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from kdlm import losses
from kdlm.config import ObjectiveConfig
from kdlm.data.format import IGNORE, response_positions
from kdlm.losses.sparse import sparse_divergence
from kdlm.models import DecoderOnly, OutputHead, unwrap


@dataclass
class StepOutput:
    loss_sum: torch.Tensor
    """Sum over the batch's response tokens of the per-token objective (differentiable)."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Sums over the batch's response tokens, e.g. {'ce': ..., 'kd': ...}; divided by the token count when logged."""


Objective = Callable[[nn.Module, dict], StepOutput]
"""An objective may also define ``prepare_window(window, *, step, student_lm, process_index) -> (window, stats)``
(on-policy methods rewrite the step's batches with sampled responses; ``stats`` are logged as they are) and
``units(batch) -> int`` (what the loss is averaged over; default: response tokens)."""


def make_objective(
    cfg: ObjectiveConfig,
    teacher: Optional[nn.Module],
    vocab_size: int,
    *,
    tokenizer=None,
    max_length: Optional[int] = None,
    seed: int = 0,
    run_dir: Optional[str] = None,
    batch_size: int = 8,
    cache=None,
) -> Objective:
    """The ``batch -> (loss, metrics)`` function for ``cfg.name``.

    ``tokenizer`` (stop and pad tokens, decoding for rewards), ``max_length``, ``seed`` and ``run_dir`` (sample
    log) are needed by the sampling methods (gkd, dpkd with dpkd_form=sequence). With ``cache`` (a
    :class:`kdlm.cache.TeacherCache`) objective kd reads the teacher's side from disk and ``teacher`` may be None.
    """
    if cfg.name == "sft":
        return _SFT(vocab_size)
    if cache is not None:  # config validation allows only objective kd with a cache
        if cfg.name != "kd":
            raise ValueError(f"objective '{cfg.name}' cannot train from a teacher cache (it needs the live teacher)")
        return _KD(cfg, None, vocab_size, cache=cache)
    if teacher is None:
        raise ValueError(f"objective '{cfg.name}' needs a teacher")
    if (cfg.name == "gkd" or cfg.dpkd_form == "sequence" or cfg.lm_data) and tokenizer is None:
        raise ValueError(f"objective '{cfg.name}' needs the tokenizer (sampling or plain text): pass tokenizer=")
    if cfg.name in ("gkd", "dpkd") and (cfg.name == "gkd" or cfg.dpkd_form == "sequence"):
        if tokenizer is None:
            raise ValueError(f"objective '{cfg.name}' samples responses: make_objective needs the tokenizer")
        from kdlm.train.onpolicy import DPKDSequence, GKD

        sampler = dict(tokenizer=tokenizer, max_length=max_length, seed=seed, run_dir=run_dir)
        objective = GKD(cfg, teacher, vocab_size, **sampler) if cfg.name == "gkd" else DPKDSequence(cfg, teacher, vocab_size, **sampler)
        if cfg.lm_data is not None:
            objective.plain_text = PlainTextBatches(cfg.lm_data, tokenizer, max_length=max_length or 512,
                                                    batch_size=batch_size, seed=seed)
        return objective
    objective = _KD(cfg, teacher, vocab_size)
    if cfg.lm_data is not None:
        objective.plain_text = PlainTextBatches(cfg.lm_data, tokenizer, max_length=max_length or 512,
                                                batch_size=batch_size, seed=seed)
    return objective


class _SFT:
    """Cross-entropy −log q(y_t) on the response tokens (the SFT baseline)."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def __call__(self, student: nn.Module, batch: dict) -> StepOutput:
        mask, targets = response_positions(batch)
        hidden = student(batch["input_ids"], batch["attention_mask"])[:, :-1][mask]
        head = OutputHead.of(unwrap(student).lm, self.vocab_size)
        nll = losses.token_nll(head.logits(hidden), targets).sum()
        return StepOutput(nll, {"ce": float(nll.detach())})


class _KD:
    """(1 − kd_ratio)·CE + kd_ratio·D(teacher ‖ student) per response token, D any divergence of kdlm.losses.

    For ``rlkd`` D is :func:`kdlm.losses.rlkd_token` around the configured divergence: the ranking term is then
    computed chunk by chunk inside the fused loss, from the same logits, with one top-k per side.
    """

    def __init__(self, cfg: ObjectiveConfig, teacher: Optional[nn.Module], vocab_size: int, cache=None):
        self.cfg = cfg
        self.teacher = teacher
        self.cache = cache  # a kdlm.cache.TeacherCache: the teacher side comes from disk, the teacher never runs
        self.vocab_size = vocab_size
        self.divergence = cfg.divergence
        self.params = cfg.divergence_params()
        if cfg.name == "rlkd":
            self.divergence = functools.partial(
                losses.rlkd_token, base=cfg.divergence, base_params=self.params, **cfg.ranking_params()
            )
            self.params = {}
        elif cfg.name == "dpkd":  # token form: the per-position preference loss takes the divergence's place
            from kdlm.losses.dpkd import dpkd_token_terms

            beta = 0.1 if cfg.dpkd_beta is None else cfg.dpkd_beta
            self.divergence, self.params = functools.partial(dpkd_token_terms, beta=beta), {}
        self.plain_text: Optional[PlainTextBatches] = None
        self.lm_weight = 0.5 if cfg.lm_weight is None else cfg.lm_weight

    def __call__(self, student: nn.Module, batch: dict) -> StepOutput:
        # Per-token weights of the CE term (GKD with a reward: the sequence's advantage), aligned with targets.
        ce_weights = batch["ce_weights"][:, 1:][response_positions(batch)[0]] if "ce_weights" in batch else None
        terms = self.terms(student, batch, self.divergence, self.params, self.kd_ratio(batch), ce_weights)
        loss_sum = terms.loss_sum  # (1 − kd_ratio)·CE + kd_ratio·D, one combined gradient on the fused path
        metrics = {"ce": float(terms.ce_sum.detach()), "kd": float(terms.divergence_sum.detach()), **{k: float(v.detach()) for k, v in terms.aux.items()}}
        if "lm_input_ids" in batch:  # DPKD's plain-text LM term, scaled to this micro-batch's share of the units
            lm_mean = plain_text_loss(self, student, batch)
            units = terms.count.to(lm_mean.dtype)
            loss_sum = loss_sum + self.lm_weight * lm_mean * units
            metrics["lm"] = float(lm_mean.detach() * units)
        return StepOutput(loss_sum, metrics)

    def kd_ratio(self, batch: dict) -> float:
        """Weight of the divergence against the (weighted) CE term for this batch; GKD with a reward overrides it."""
        return self.cfg.kd_ratio

    def terms(self, student: nn.Module, batch: dict, divergence, params: dict, kd_ratio: float,
              ce_weights: Optional[torch.Tensor] = None) -> "losses.KDTerms":
        """Sums of (1 − kd_ratio)·CE + kd_ratio·D over the batch's response tokens (fused path by default).

        The teacher side is the live teacher's hidden states and output layer, or, with a teacher cache, the
        cached sparse signal of each token, which :func:`kdlm.losses.sparse.sparse_divergence` compares on the
        collapsed (stored ids + tail bucket) distributions.
        """
        cfg = self.cfg
        mask, targets = response_positions(batch)
        student_hidden = student(batch["input_ids"], batch["attention_mask"])[:, :-1][mask]
        s_head = OutputHead.of(unwrap(student).lm, self.vocab_size)
        cache = getattr(self, "cache", None)
        if cache is not None:
            teacher_rows, t_head = cache.payload(batch), None
            divergence, params = functools.partial(sparse_divergence, base=divergence, base_params=params), {}
        else:
            with torch.no_grad():
                teacher_rows = DecoderOnly(self.teacher)(batch["input_ids"], batch["attention_mask"])[:, :-1][mask]
            t_head = OutputHead.of(self.teacher, self.vocab_size)
        flat_mask = torch.ones(student_hidden.shape[0], dtype=torch.bool, device=student_hidden.device)
        if cfg.fused:
            return losses.fused_kd_terms(
                student_hidden, s_head.weight, teacher_rows, None if t_head is None else t_head.weight, flat_mask,
                divergence=divergence, temperature=cfg.temperature,
                student_bias=s_head.bias, teacher_bias=None if t_head is None else t_head.bias,
                student_logit_scale=s_head.scale, teacher_logit_scale=1.0 if t_head is None else t_head.scale,
                student_softcap=s_head.softcap, teacher_softcap=None if t_head is None else t_head.softcap,
                labels=targets, chunk_size=cfg.chunk_size, compile=cfg.compile, kd_ratio=kd_ratio,
                label_weights=ce_weights, **params,
            )
        teacher_logits = teacher_rows if t_head is None else t_head.logits(teacher_rows)
        return losses.kd_terms(
            s_head.logits(student_hidden), teacher_logits, flat_mask, labels=targets,
            divergence=divergence, temperature=cfg.temperature, kd_ratio=kd_ratio, label_weights=ce_weights, **params,
        )

    def prepare_window(self, window: list[dict], *, step: int, student_lm: nn.Module, process_index: int):
        """With DPKD's ``lm_data``: attach a plain-text batch to every micro-batch (``lm_*`` keys)."""
        if self.plain_text is not None:
            for micro, batch in enumerate(window):
                batch.update(self.plain_text.batch(step, process_index, micro, batch["input_ids"].device))
        return window, {}


class PlainTextBatches:
    """Seeded batches of a plain-text corpus (DPKD's LM term): every token is a label, none is a prompt."""

    def __init__(self, path: str, tokenizer, *, max_length: int, batch_size: int, seed: int):
        from kdlm.data.sources import read_texts

        ids = [tokenizer(text, add_special_tokens=True)["input_ids"][:max_length] for text in read_texts(path)]
        self.sequences = [x for x in ids if len(x) >= 2]
        if not self.sequences:
            raise ValueError(f"objective.lm_data {path}: no text of at least two tokens")
        self.pad_id, self.batch_size, self.seed = tokenizer.pad_token_id, batch_size, seed

    def batch(self, step: int, process_index: int, micro: int, device) -> dict:
        import random

        rng = random.Random(f"{self.seed}/lm/{step}/{process_index}/{micro}")  # different per rank and micro-batch
        picked = [self.sequences[rng.randrange(len(self.sequences))] for _ in range(self.batch_size)]
        width = max(len(x) for x in picked)
        input_ids = torch.full((len(picked), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(picked), width), IGNORE, dtype=torch.long)
        attention = torch.zeros((len(picked), width), dtype=torch.long)
        for row, seq in enumerate(picked):
            input_ids[row, : len(seq)] = torch.tensor(seq)
            labels[row, : len(seq)] = torch.tensor(seq)
            attention[row, : len(seq)] = 1
        return {"lm_input_ids": input_ids.to(device), "lm_labels": labels.to(device), "lm_attention_mask": attention.to(device)}


def plain_text_loss(objective, student: nn.Module, batch: dict) -> torch.Tensor:
    """Mean over the plain-text batch's tokens of (1 − kd_ratio)·CE + kd_ratio·FKL (the DPKD reference's LM term)."""
    text = {"input_ids": batch["lm_input_ids"], "labels": batch["lm_labels"], "attention_mask": batch["lm_attention_mask"]}
    terms = _KD.terms(objective, student, text, "fkl", {}, objective.cfg.kd_ratio)
    return terms.loss_sum / terms.count.clamp_min(1).to(terms.loss_sum.dtype)
