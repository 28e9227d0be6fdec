"""The two tables that name kdlm's methods: objectives and divergences. Nothing else lists them.

Torch-free on purpose: :mod:`kdlm.config` derives its allowed names, its method-only keys and its defaults from
these tables (``kdlm validate`` stays fast), :mod:`kdlm.report` its loss-term names, and the training side its
builders (:func:`kdlm.train.objectives.make_objective`) and functions (:data:`kdlm.losses.DIVERGENCES`).
How to add a method or a divergence: ``docs/architecture.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class DivergenceSpec:
    """What the rest of kdlm needs to know about a per-token divergence besides its function.

    The function itself is ``kdlm.losses.divergences.<name>`` (same name as the table key).
    """

    params: dict[str, float] = field(default_factory=dict)
    """Its own parameters (each an ``objective.<param>`` config key) and their defaults."""
    needs_teacher_support: bool = False
    """Infinite-ish where the teacher has no mass (a q·log(q/0) term): a sampled teacher cache, which has no
    mass outside its draws, cannot stand in for the teacher (config refuses cache.mode=sampled with it)."""


DIVERGENCES: dict[str, DivergenceSpec] = {
    "fkl": DivergenceSpec(),
    "rkl": DivergenceSpec(needs_teacher_support=True),
    "jsd": DivergenceSpec({"beta": 0.5}),
    "tvd": DivergenceSpec(),
    "skew_fkl": DivergenceSpec({"alpha": 0.1}),
    "skew_rkl": DivergenceSpec({"alpha": 0.1}),
    "akl": DivergenceSpec({"mu": 0.5}, needs_teacher_support=True),
}


def param_owners() -> dict[str, tuple[str, ...]]:
    """Divergence parameter -> the divergences that take it (setting it for another one is a contradiction)."""
    owners: dict[str, list[str]] = {}
    for name, spec in DIVERGENCES.items():
        for param in spec.params:
            owners.setdefault(param, []).append(name)
    return {param: tuple(names) for param, names in owners.items()}


@dataclass(frozen=True)
class ObjectiveSpec:
    """An objective (``objective.name``): where its class lives and what config keys and metrics it owns."""

    builder: str
    """``'module:Class'``; the class implements :class:`kdlm.train.objectives.base.Objective` and is built as
    ``Class(cfg, context)`` (:class:`kdlm.train.objectives.base.BuildContext`)."""
    keys: tuple[str, ...] = ()
    """``objective.*`` keys that only this objective takes (setting one for another objective is an error)."""
    defaults: dict[str, Any] = field(default_factory=dict)
    """Values of its keys (and of shared ones such as divergence/kd_ratio) when left unset; over BASE_DEFAULTS."""
    metrics: dict[str, str] = field(default_factory=dict)
    """Loss terms it logs to metrics.jsonl (summed per unit), with the title the report plots them under."""
    divergence: bool = True
    """It uses objective.divergence and the divergence's parameters."""
    needs_teacher: bool = True
    """It compares the student with a teacher (live or cached)."""
    teacher_cache: bool = False
    """It can train from an offline teacher cache (cache.dir) instead of the live teacher."""
    shown: tuple[str, ...] = ()
    """Config keys the report prints next to the method's name."""


BASE_DEFAULTS: dict[str, Any] = {"divergence": "fkl", "kd_ratio": 0.5}
"""Defaults of the shared keys; ``validate`` fills divergence and kd_ratio into the resolved config."""

OBJECTIVES: dict[str, ObjectiveSpec] = {
    "sft": ObjectiveSpec(
        "kdlm.train.objectives.sft:SFT", metrics={"ce": "cross-entropy term"}, divergence=False, needs_teacher=False,
    ),
    "kd": ObjectiveSpec(
        "kdlm.train.objectives.cross_tokenizer:build_kd", keys=("cross_tokenizer", "uld_weight"),
        defaults={"uld_weight": 1.0},
        metrics={"ce": "cross-entropy term", "kd": "divergence term", "xtok_segment": "cross-tokenizer span term"},
        teacher_cache=True, shown=("divergence",),
    ),
    "rlkd": ObjectiveSpec(
        "kdlm.train.objectives.kd:RLKD", keys=("rank_weight", "rank_k", "rank_strength", "rank_dynamic"),
        defaults={"rank_weight": 2.0, "rank_k": 5, "rank_strength": 1.0, "rank_dynamic": False},
        metrics={"ce": "cross-entropy term", "kd": "divergence term", "rank": "ranking term (1 − ρ)",
                 "base": "base divergence (RLKD)"},
        shown=("divergence",),
    ),
    "gkd": ObjectiveSpec(
        "kdlm.train.objectives.gkd:GKD", keys=("lmbda", "seq_kd", "reward_fn", "reward_alpha"),
        defaults={"divergence": "jsd", "kd_ratio": 1.0, "lmbda": 0.5, "seq_kd": False, "reward_alpha": 0.5},
        metrics={"ce": "cross-entropy term", "kd": "divergence term", "pg_surrogate": "policy-gradient surrogate"},
        shown=("divergence",),
    ),
    "dpkd": ObjectiveSpec(
        "kdlm.train.objectives.dpkd:build", keys=("dpkd_form", "dpkd_beta", "refresh_every", "lm_data", "lm_weight"),
        defaults={"dpkd_form": "token", "dpkd_beta": 0.1, "refresh_every": 1, "lm_weight": 0.5},
        metrics={"ce": "cross-entropy term", "kd": "divergence term", "dpkd": "DPKD preference term",
                 "lm": "plain-text LM term"},
        divergence=False, shown=("dpkd_form",),
    ),
}


def objective_default(name: str, key: str) -> Any:
    """The value ``objective.<key>`` takes for objective ``name`` when it is left unset (None if it has none)."""
    return OBJECTIVES[name].defaults.get(key, BASE_DEFAULTS.get(key))


def loss_terms() -> dict[str, str]:
    """Every logged loss term of every objective (first title wins), in table order."""
    terms: dict[str, str] = {}
    for spec in OBJECTIVES.values():
        for name, title in spec.metrics.items():
            terms.setdefault(name, title)
    return terms
