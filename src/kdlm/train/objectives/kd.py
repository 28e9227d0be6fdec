"""Word-level distillation: ``(1 − kd_ratio)·CE + kd_ratio·D(teacher ‖ student)`` per response token (kd, rlkd).

:func:`distill_terms` is the one place where a batch meets the teacher (live, or its cached sparse signal) and
the loss (fused chunked path by default); every objective that compares the two distributions token by token
goes through it (kd, rlkd, gkd, dpkd's token form and its plain-text LM term).
"""

from __future__ import annotations

import functools
from typing import Callable, Optional, Union

import torch
from torch import nn

from kdlm import losses
from kdlm.config import ObjectiveConfig
from kdlm.data.format import response_positions
from kdlm.losses.sparse import sparse_divergence
from kdlm.models import DecoderOnly, OutputHead, unwrap
from kdlm.teacher_server import PAYLOAD_KEY
from kdlm.train.objectives.base import BuildContext, ObjectiveBase, StepOutput


def distill_terms(
    student: nn.Module,
    batch: dict,
    cfg: ObjectiveConfig,
    vocab_size: int,
    *,
    divergence: Union[str, Callable],
    params: dict,
    kd_ratio: float,
    teacher: Optional[nn.Module] = None,
    cache=None,
    ce_weights: Optional[torch.Tensor] = None,
) -> "losses.KDTerms":
    """Sums of (1 − kd_ratio)·CE + kd_ratio·D over the batch's response tokens (fused path unless cfg.fused is off).

    ``student`` is the :class:`~kdlm.models.DecoderOnly` wrapper (possibly inside a data-parallel wrapper). The
    teacher side is the live ``teacher``'s hidden states and output layer, or, with ``cache`` (a
    :class:`kdlm.losses.sparse.TeacherSignal`: the offline cache or a served teacher), the sparse signal of each
    token (``batch["teacher_payload"]`` when the loop prefetched it), which
    :func:`kdlm.losses.sparse.sparse_divergence` compares on the collapsed (stored ids + tail bucket)
    distributions. ``ce_weights`` are per-token weights of the CE term aligned with the response tokens.
    Temperature, chunk size and compilation come from ``cfg``.
    """
    mask, targets = response_positions(batch)
    student_hidden = student(batch["input_ids"], batch["attention_mask"])[:, :-1][mask]
    s_head = OutputHead.of(unwrap(student).lm, vocab_size)
    if cache is not None:
        # The payload prefetched with the batch (a served teacher, kdlm.teacher_server), else the source's lookup.
        prefetched = batch.get(PAYLOAD_KEY)
        teacher_rows, t_head = (cache.payload(batch) if prefetched is None else prefetched), None
        divergence, params = functools.partial(sparse_divergence, base=divergence, base_params=params), {}
    else:
        with torch.no_grad():
            teacher_rows = DecoderOnly(teacher)(batch["input_ids"], batch["attention_mask"])[:, :-1][mask]
        t_head = OutputHead.of(teacher, vocab_size)
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


class KD(ObjectiveBase):
    """(1 − kd_ratio)·CE + kd_ratio·D(teacher ‖ student) per response token, D any divergence of kdlm.losses."""

    def __init__(self, cfg: ObjectiveConfig, context: BuildContext):
        self.cfg = cfg
        self.teacher = context.teacher
        self.cache = context.cache  # a kdlm.cache.TeacherCache: the teacher side comes from disk, the teacher never runs
        self.vocab_size = context.vocab_size
        self.divergence: Union[str, Callable] = cfg.divergence
        self.params = cfg.divergence_params()

    def __call__(self, student: nn.Module, batch: dict) -> StepOutput:
        # Per-token weights of the CE term (GKD with a reward: the sequence's advantage), aligned with targets.
        ce_weights = batch["ce_weights"][:, 1:][response_positions(batch)[0]] if "ce_weights" in batch else None
        terms = distill_terms(student, batch, self.cfg, self.vocab_size, divergence=self.divergence,
                              params=self.params, kd_ratio=self.kd_ratio(batch), teacher=self.teacher,
                              cache=self.cache, ce_weights=ce_weights)
        # (1 − kd_ratio)·CE + kd_ratio·D, one combined gradient on the fused path
        metrics = {"ce": float(terms.ce_sum.detach()), "kd": float(terms.divergence_sum.detach()),
                   **{k: float(v.detach()) for k, v in terms.aux.items()}}
        return StepOutput(terms.loss_sum, metrics)

    def kd_ratio(self, batch: dict) -> float:
        """Weight of the divergence against the (weighted) CE term for this batch; GKD with a reward overrides it."""
        return self.cfg.kd_ratio


class RLKD(KD):
    """KD whose per-token divergence is :func:`kdlm.losses.rlkd_token` around the configured divergence.

    The ranking term is computed chunk by chunk inside the fused loss, from the same logits, with one top-k per
    side.
    """

    def __init__(self, cfg: ObjectiveConfig, context: BuildContext):
        super().__init__(cfg, context)
        self.divergence = functools.partial(
            losses.rlkd_token, base=cfg.divergence, base_params=self.params, **cfg.ranking_params()
        )
        self.params = {}
