"""The cross-tokenizer objective (``objective.cross_tokenizer``): KD between models whose tokenizers differ.

Batches come from :func:`kdlm.data.align.collate_pairs`: the student's sequence (``input_ids``, ``labels``), the
teacher's own sequence of the same example (``teacher_input_ids``, its own chat template) and the alignment of the
response. The loss is :func:`kdlm.losses.cross_tokenizer.cross_tokenizer_terms` (docs/losses.md). With a teacher
cache (``cache.dir``, built by ``kdlm cache-teacher`` with the same ``objective.cross_tokenizer``) the teacher never
runs: its signal on its own tokens is read from disk (docs/cache.md says what is exact and what approximate).
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn

from kdlm.config import ObjectiveConfig
from kdlm.data.format import response_positions
from kdlm.losses.cross_tokenizer import VocabMap, cross_tokenizer_terms
from kdlm.models import DecoderOnly, OutputHead, unwrap
from kdlm.train.objectives.base import BuildContext, ObjectiveBase, StepOutput

log = logging.getLogger(__name__)


class CrossTokenizerKD(ObjectiveBase):
    """(1 − kd_ratio)·CE + kd_ratio·(ULD or the align method) per student response token."""

    def __init__(self, cfg: ObjectiveConfig, teacher: Optional[nn.Module], vocab_size: int, teacher_vocab_size: int,
                 vocab_map: Optional[VocabMap], cache=None):
        self.cfg, self.teacher = cfg, teacher
        self.cache = cache  # a cross-tokenizer kdlm.cache.TeacherCache: the teacher side comes from disk
        self.vocab_size, self.teacher_vocab_size = vocab_size, teacher_vocab_size
        self.vocab_map = vocab_map
        self._device_map: dict = {}

    def _map(self, device) -> Optional[VocabMap]:
        if self.vocab_map is None:
            return None
        if device not in self._device_map:
            self._device_map[device] = self.vocab_map.to(device)
        return self._device_map[device]

    def cached_signal(self, batch: dict) -> torch.Tensor:
        """[B·(L_T − 1), 2k + 2]: the cache's rows laid out like the live teacher's flattened hidden states
        (``teacher_hidden[:, :-1].reshape(-1, H)``, which ``xtok_pair`` and the segments index). Rows that predict no
        teacher response token hold a harmless placeholder (all mass on token 0): the fused path computes unpaired
        rows too and masks them afterwards, so they must be finite."""
        teacher_batch = {"input_ids": batch["teacher_input_ids"], "attention_mask": batch["teacher_attention_mask"],
                         "labels": batch["teacher_labels"]}
        rows = self.cache.payload(teacher_batch)
        width = (rows.shape[-1] - 2) // 2
        placeholder = torch.full((rows.shape[-1],), float("-inf"), device=rows.device)
        placeholder[:width] = 0.0  # ids
        placeholder[width] = 0.0  # log-prob 0 on the first id
        placeholder[-1] = 0.0  # own-token log-prob
        t_mask, _ = response_positions(teacher_batch)
        table = placeholder.repeat(t_mask.numel(), 1)
        table[t_mask.reshape(-1)] = rows
        return table

    def terms(self, student: nn.Module, batch: dict):
        """The loss terms of one batch (:class:`kdlm.losses.KDTerms`)."""
        cfg = self.cfg
        mask, targets = response_positions(batch)
        student_hidden = student(batch["input_ids"], batch["attention_mask"])[:, :-1][mask]
        teacher_hidden = t_head = signal = None
        if self.cache is not None:
            signal = self.cached_signal(batch)
        else:
            with torch.no_grad():
                teacher_hidden = DecoderOnly(self.teacher)(batch["teacher_input_ids"], batch["teacher_attention_mask"])[:, :-1]
            teacher_hidden = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
            t_head = OutputHead.of(self.teacher, self.teacher_vocab_size)
        t_rows = batch["xtok_teacher_segment"][:, 1:] >= 0
        return cross_tokenizer_terms(
            student_hidden, OutputHead.of(unwrap(student).lm, self.vocab_size),
            teacher_hidden, t_head,
            batch["xtok_pair"][:, 1:][mask], targets,
            method=cfg.cross_tokenizer, vocab_map=self._map(student_hidden.device), divergence=cfg.setting("divergence"),
            params=cfg.divergence_params(), temperature=cfg.temperature, kd_ratio=cfg.setting("kd_ratio"),
            uld_weight=cfg.setting("uld_weight"),
            student_segments=batch["xtok_student_segment"][:, 1:][mask],
            teacher_segments=batch["xtok_teacher_segment"][:, 1:].reshape(-1),
            teacher_targets=torch.where(t_rows, batch["teacher_input_ids"][:, 1:], 0).reshape(-1),
            chunk_size=cfg.chunk_size, teacher_signal=signal, teacher_vocab=self.teacher_vocab_size,
        )

    def __call__(self, student: nn.Module, batch: dict) -> StepOutput:
        terms = self.terms(student, batch)
        metrics = {"ce": float(terms.ce_sum), "kd": float(terms.divergence_sum),
                   "xtok_segment": float(terms.aux["xtok_segment"]), "xtok_aligned": float(terms.count)}
        return StepOutput(terms.loss_sum, metrics)


def make_cross_tokenizer_objective(cfg: ObjectiveConfig, teacher: Optional[nn.Module], vocab_size: int, student_tokenizer,
                                   teacher_tokenizer, teacher_vocab_size: Optional[int], cache=None) -> CrossTokenizerKD:
    """The objective for ``cfg.cross_tokenizer``; the shared vocabulary is built here for the align method. ``cache``:
    a cross-tokenizer :class:`kdlm.cache.TeacherCache` read instead of running ``teacher`` (then None)."""
    from kdlm.data.align import shared_vocabulary

    if student_tokenizer is None or teacher_tokenizer is None:
        raise ValueError("objective.cross_tokenizer needs both tokenizers: pass tokenizer= and teacher_tokenizer=")
    teacher_vocab_size = teacher_vocab_size or max(teacher_tokenizer.get_vocab().values()) + 1
    vocab_map = None
    if cfg.cross_tokenizer == "align":
        pairs = shared_vocabulary(student_tokenizer, teacher_tokenizer, vocab_size, teacher_vocab_size)
        vocab_map = VocabMap.from_pairs(pairs, vocab_size, teacher_vocab_size)
        log.info("cross-tokenizer align: %d tokens spell the same in both vocabularies (student %d, teacher %d)%s",
                 len(pairs), vocab_size, teacher_vocab_size, " (identical: token-level KD)" if vocab_map.identity else "")
    if cache is not None and not cache.cross_tokenizer:
        raise ValueError(f"the teacher cache {cache.folder} was not built with objective.cross_tokenizer")
    return CrossTokenizerKD(cfg, teacher, vocab_size, teacher_vocab_size, vocab_map, cache)


def build_kd(cfg: ObjectiveConfig, context: BuildContext):
    """Objective kd's builder: ordinary KD, or, with ``objective.cross_tokenizer``, :class:`CrossTokenizerKD`."""
    if cfg.cross_tokenizer is None:
        from kdlm.train.objectives.kd import KD

        return KD(cfg, context)
    return make_cross_tokenizer_objective(cfg, context.teacher, context.vocab_size, context.tokenizer,
                                          context.teacher_tokenizer, context.teacher_vocab_size, context.cache)
