"""Teacher-forced evaluation: per-token KL(teacher ‖ student) and cross-entropies on held-out responses."""

from __future__ import annotations

from collections import defaultdict
from typing import Optional

import torch
from torch import nn

from kdlm import losses
from kdlm.data.format import Tokenized, collate, response_positions
from kdlm.models import DecoderOnly, OutputHead


@torch.no_grad()
def teacher_forced_metrics(
    student_lm: nn.Module,
    teacher_lm: Optional[nn.Module],
    items: list[Tokenized],
    *,
    vocab_size: int,
    pad_id: int,
    batch_size: int = 16,
) -> dict:
    """Mean over all held-out response tokens of KL(p_teacher ‖ q_student) (nats, τ = 1), the student's and
    the teacher's cross-entropy on the responses, and the peak alignment ``cr@5``/``mor@5`` (RLKD's CR@k and
    MOR@k, :func:`kdlm.losses.peak_alignment_metrics`), overall and per domain.

    Token-weighted means (every response token counts once), the quantity the demo's target is stated in.
    """
    was_training = student_lm.training
    student_lm.eval()
    device = next(student_lm.parameters()).device
    sums: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        batch = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
        mask, targets = response_positions(batch)
        student_logits = OutputHead.of(student_lm, vocab_size).logits(
            DecoderOnly(student_lm)(batch["input_ids"], batch["attention_mask"])[:, :-1][mask]
        )
        per_token = {"student_ce": losses.token_nll(student_logits, targets)}
        if teacher_lm is not None:
            teacher_logits = OutputHead.of(teacher_lm, vocab_size).logits(
                DecoderOnly(teacher_lm)(batch["input_ids"], batch["attention_mask"])[:, :-1][mask]
            )
            per_token["kl"] = losses.fkl(student_logits, teacher_logits)
            per_token["teacher_ce"] = losses.token_nll(teacher_logits, targets)
            # RLKD's peak alignment (top-5 lists equal / overlap share), for every method, not only rlkd.
            per_token["cr@5"], per_token["mor@5"] = losses.peak_alignment_tokens(student_logits, teacher_logits, 5)
        # Which example each selected position belongs to, for per-domain sums.
        rows = mask.nonzero()[:, 0]
        for name, values in per_token.items():
            for row, item in enumerate(chunk):
                picked = values[rows == row]
                for key in ("overall", f"domain/{item.domain}"):
                    sums[key][name] += float(picked.double().sum())
                    sums[key]["_tokens_" + name] += picked.numel()
    student_lm.train(was_training)
    result = {}
    for key, values in sums.items():
        result[key] = {
            name: values[name] / max(values["_tokens_" + name], 1) for name in values if not name.startswith("_tokens_")
        }
        result[key]["tokens"] = int(values["_tokens_student_ce"])
    return result
