"""The objective protocol: what the training loop calls, and nothing else.

An objective returns SUMS over the batch's units (response tokens by default); the training loop divides by the
units of the whole optimizer step across all processes (so gradient accumulation and data parallelism give the
same loss as one large batch). Logits are computed only at response positions: prompt positions need no output
layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol

import torch
from torch import nn

from kdlm.data.format import Batch, response_positions


@dataclass
class StepOutput:
    loss_sum: torch.Tensor
    """Sum over the batch's units of the per-unit objective (differentiable)."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Sums over the batch's units, e.g. {'ce': ..., 'kd': ...}; divided by the step's unit count when logged."""


@dataclass
class BuildContext:
    """What an objective may need besides its config; :func:`kdlm.train.objectives.make_objective` fills it."""

    teacher: Optional[nn.Module]
    """The live teacher (a Hugging Face causal LM); None for sft and with a teacher cache."""
    vocab_size: int
    """The shared tokenizer's vocabulary size (output rows past it are padding)."""
    tokenizer: Any = None
    """Stop and pad tokens, decoding for rewards, plain-text tokenisation."""
    max_length: Optional[int] = None
    """Cap on prompt + sampled response (data.max_length)."""
    seed: int = 0
    """train.seed: sampling and plain-text batches are seeded from it."""
    run_dir: Optional[str] = None
    """Where samples.jsonl goes (sampling objectives)."""
    batch_size: int = 8
    """Plain-text batch size (DPKD's LM term)."""
    cache: Any = None
    """A :class:`kdlm.cache.TeacherCache`: the teacher side comes from disk."""
    teacher_tokenizer: Any = None
    """objective.cross_tokenizer only: the teacher's own tokenizer (``tokenizer`` is then the student's)."""
    teacher_vocab_size: Optional[int] = None
    """objective.cross_tokenizer only: the teacher's real vocabulary size (``vocab_size`` is the student's)."""


class Objective(Protocol):
    """A training objective (one class per ``objective.name``, listed in :data:`kdlm.registry.OBJECTIVES`)."""

    def __call__(self, student: nn.Module, batch: Batch) -> StepOutput:
        """Loss and metric SUMS over ``batch``'s units; ``student`` is the :class:`kdlm.models.DecoderOnly` wrapper."""
        ...

    def prepare_window(self, draw: Callable[[int], Optional[list[Batch]]], *, step: int, student_lm: nn.Module,
                       process_index: int) -> tuple[list[Batch], dict[str, float]]:
        """Step ``step``'s micro-batches, ready for the loss: drawn with ``draw(step)`` and rewritten (on-policy
        methods sample responses here). An objective may draw the next steps of the data stream ahead, in order
        (``draw(step + 1)``, ..., None past the last step), and then must keep them (see :meth:`state_dict`) and
        not draw them again. Returns the batches and stats of this process that are logged with the step as they
        are (the objective may still add entries while its loss runs on the step's batches)."""
        ...

    def state_dict(self) -> dict:
        """What the objective carries from step to step (e.g. batches sampled ahead): plain containers and CPU
        tensors, saved with every checkpoint (per process); empty when there is nothing."""
        ...

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output when a run resumes."""
        ...

    def units(self, batch: Batch) -> int:
        """What the loss is averaged over in ``batch`` (response tokens, or e.g. DPKD's pairs)."""
        ...


class ObjectiveBase:
    """Defaults of the optional protocol methods: the window is used as drawn, units are response tokens, no state."""

    def prepare_window(self, draw: Callable[[int], Optional[list[Batch]]], *, step: int, student_lm: nn.Module,
                       process_index: int) -> tuple[list[Batch], dict[str, float]]:
        return draw(step), {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, but was given {sorted(state)}")

    def units(self, batch: Batch) -> int:
        return int(response_positions(batch)[0].sum())

