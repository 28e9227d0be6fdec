"""Distillation losses: per-token divergences, the masked reducer and the fused chunked path.

See ``docs/losses.md`` for formulas, directions, defaults and sources.
"""

from kdlm.losses.divergences import (
    DEFAULT_PARAMS,
    DIVERGENCES,
    LOG_FLOOR,
    akl,
    fkl,
    jsd,
    log_probs,
    resolve_divergence,
    rkl,
    skew_fkl,
    skew_rkl,
    token_nll,
    tvd,
)
from kdlm.losses.dpkd import dpkd_sequence_loss, dpkd_token_loss
from kdlm.losses.fused import fused_distill_loss, fused_kd_terms
from kdlm.losses.ranking import (
    peak_alignment_metrics,
    peak_alignment_tokens,
    ranking_loss,
    rlkd_token,
    soft_rank,
    topk_overlap,
)
from kdlm.losses.reduce import KDTerms, distill_loss, kd_terms, normalize

__all__ = [
    "DEFAULT_PARAMS",
    "DIVERGENCES",
    "KDTerms",
    "LOG_FLOOR",
    "akl",
    "distill_loss",
    "dpkd_sequence_loss",
    "dpkd_token_loss",
    "fkl",
    "fused_distill_loss",
    "fused_kd_terms",
    "jsd",
    "kd_terms",
    "log_probs",
    "normalize",
    "peak_alignment_metrics",
    "peak_alignment_tokens",
    "ranking_loss",
    "resolve_divergence",
    "rkl",
    "rlkd_token",
    "skew_fkl",
    "skew_rkl",
    "soft_rank",
    "token_nll",
    "topk_overlap",
    "tvd",
]
