"""SFT: cross-entropy −log q(y_t) on the response tokens (the baseline; no teacher)."""

from __future__ import annotations

from torch import nn

from kdlm import losses
from kdlm.config import ObjectiveConfig
from kdlm.data.format import response_positions
from kdlm.models import OutputHead, unwrap
from kdlm.train.objectives.base import BuildContext, ObjectiveBase, StepOutput


class SFT(ObjectiveBase):
    """Sum over the batch's response tokens of −log q(y_t)."""

    def __init__(self, cfg: ObjectiveConfig, context: BuildContext):
        self.vocab_size = context.vocab_size

    def __call__(self, student: nn.Module, batch: dict) -> StepOutput:
        mask, targets = response_positions(batch)
        hidden = student(batch["input_ids"], batch["attention_mask"])[:, :-1][mask]
        head = OutputHead.of(unwrap(student).lm, self.vocab_size)
        nll = losses.token_nll(head.logits(hidden), targets).sum()
        return StepOutput(nll, {"ce": float(nll.detach())})
