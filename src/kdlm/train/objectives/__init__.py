"""Training objectives: one class per ``objective.name``, behind the :class:`~kdlm.train.objectives.base.Objective`
protocol; :data:`kdlm.registry.OBJECTIVES` names them (its ``builder`` column) and :func:`make_objective` builds
the configured one. The training loop knows nothing else about a method.
"""

from __future__ import annotations

import importlib
from typing import Optional

from torch import nn

from kdlm.config import ObjectiveConfig
from kdlm.registry import OBJECTIVES
from kdlm.train.objectives.base import BuildContext, Objective, ObjectiveBase, StepOutput

__all__ = ["BuildContext", "Objective", "ObjectiveBase", "StepOutput", "make_objective"]


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
    teacher_tokenizer=None,
    teacher_vocab_size: Optional[int] = None,
) -> Objective:
    """The objective of ``cfg.name``, built from its row of :data:`kdlm.registry.OBJECTIVES`.

    ``tokenizer`` (stop and pad tokens, decoding for rewards), ``max_length``, ``seed`` and ``run_dir`` (sample
    log) are needed by the sampling methods (gkd, dpkd with dpkd_form=sequence) and the plain-text LM term. With
    ``cache`` (a :class:`kdlm.cache.TeacherCache`) an objective that can train from it reads the teacher's side
    from disk and ``teacher`` may be None. With ``objective.cross_tokenizer``, ``tokenizer`` is the student's and
    ``teacher_tokenizer`` / ``teacher_vocab_size`` the teacher's.
    """
    spec = OBJECTIVES[cfg.name]
    if cache is not None and not spec.teacher_cache:  # config validation already refuses this combination
        raise ValueError(f"objective '{cfg.name}' cannot train from a teacher cache (it needs the live teacher)")
    if cache is not None:
        teacher = None
    elif teacher is None and spec.needs_teacher:
        raise ValueError(f"objective '{cfg.name}' needs a teacher")
    module_name, _, attr = spec.builder.partition(":")
    builder = getattr(importlib.import_module(module_name), attr)
    context = BuildContext(teacher=teacher, vocab_size=vocab_size, tokenizer=tokenizer, max_length=max_length,
                           seed=seed, run_dir=run_dir, batch_size=batch_size, cache=cache,
                           teacher_tokenizer=teacher_tokenizer, teacher_vocab_size=teacher_vocab_size)
    return builder(cfg, context)
