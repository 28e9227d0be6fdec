"""The method tables (kdlm.registry) and what config, losses and the objectives derive from them."""

from __future__ import annotations

import importlib
import inspect
import typing

import pytest

from kdlm import registry
from kdlm.config import Config, ConfigError, Divergence, ObjectiveName, validate


def test_every_divergence_in_the_table_is_a_function_taking_its_parameters_with_the_same_defaults():
    from kdlm.losses import divergences

    for name, spec in registry.DIVERGENCES.items():
        fn = getattr(divergences, name, None)
        assert callable(fn), f"registry names divergence {name!r} but kdlm.losses.divergences has no function {name}"
        signature = inspect.signature(fn)
        for param, default in spec.params.items():
            assert param in signature.parameters, f"{name} does not take {param}"
            assert signature.parameters[param].default == default, f"{name}.{param}: table {default}, function differs"
        own = {p for p, v in signature.parameters.items()
               if v.kind is inspect.Parameter.KEYWORD_ONLY and p not in ("temperature", "aux")}
        assert own == set(spec.params), f"{name} takes {sorted(own)}, the table lists {sorted(spec.params)}"
        assert divergences.DIVERGENCES[name] is fn


def test_config_allows_exactly_the_table_names():
    assert typing.get_args(Divergence) == tuple(registry.DIVERGENCES)
    assert typing.get_args(ObjectiveName) == tuple(registry.OBJECTIVES)
    bad = Config()
    bad.objective.name = "distill"
    with pytest.raises(ConfigError, match="objective.name must be one of sft, kd"):
        validate(bad)
    bad = Config()
    bad.objective.divergence = "kl"
    with pytest.raises(ConfigError, match="objective.divergence must be one of fkl, rkl"):
        validate(bad)


@pytest.mark.parametrize("method", list(registry.OBJECTIVES))
def test_every_objective_builder_implements_the_protocol(method):
    module, _, attr = registry.OBJECTIVES[method].builder.partition(":")
    builder = getattr(importlib.import_module(module), attr)
    classes = [builder] if inspect.isclass(builder) else []
    if method == "dpkd":  # a function choosing the form
        from kdlm.train.objectives.dpkd import DPKDSequence, DPKDToken

        classes = [DPKDSequence, DPKDToken]
    if method == "kd":  # a function choosing plain KD or, with objective.cross_tokenizer, CrossTokenizerKD
        from kdlm.train.objectives.cross_tokenizer import CrossTokenizerKD
        from kdlm.train.objectives.kd import KD

        classes = [KD, CrossTokenizerKD]
    for cls in classes:
        for hook in ("__call__", "prepare_window", "units"):
            assert callable(getattr(cls, hook, None)), f"{cls.__name__} lacks {hook}"


@pytest.mark.parametrize("method", list(registry.OBJECTIVES))
def test_a_method_key_set_for_another_method_is_refused_naming_its_owner(method):
    values = {"rank_k": 3, "rank_weight": 1.0, "rank_strength": 1.0, "rank_dynamic": True, "lmbda": 0.5,
              "seq_kd": True, "reward_fn": "m:f", "reward_alpha": 0.5, "dpkd_form": "token", "dpkd_beta": 0.2,
              "refresh_every": 2, "lm_data": "x.jsonl", "lm_weight": 0.3, "cross_tokenizer": "align", "uld_weight": 0.5}
    other = next(name for name in registry.OBJECTIVES if name != method)
    for key in registry.OBJECTIVES[method].keys:
        cfg = Config()
        cfg.objective.name = other
        setattr(cfg.objective, key, values[key])
        with pytest.raises(ConfigError, match=f"objective.{key} applies to objective.name={method}, not '{other}'"):
            validate(cfg)


def test_defaults_come_from_the_table():
    cfg = Config()
    cfg.objective.name = "gkd"
    validate(cfg)
    # GKD's paper defaults: generalized JSD, no CE term, λ = 0.5 (hand-written here, not read from the table).
    assert (cfg.objective.divergence, cfg.objective.kd_ratio, cfg.objective.setting("lmbda")) == ("jsd", 1.0, 0.5)
    cfg = Config()
    cfg.objective.name = "rlkd"
    validate(cfg)
    assert cfg.objective.ranking_params() == {"rank_weight": 2.0, "k": 5, "regularization_strength": 1.0,
                                              "dynamic": False}
    cfg.objective.rank_k = 9
    assert cfg.objective.ranking_params()["k"] == 9


def test_sampled_cache_is_refused_for_the_divergences_that_need_teacher_support():
    needs = {name for name, spec in registry.DIVERGENCES.items() if spec.needs_teacher_support}
    assert needs == {"rkl", "akl"}  # the two with a q·log(q/p) term outside p's support (docs/cache.md)
    for name in registry.DIVERGENCES:
        cfg = Config()
        cfg.cache.dir, cfg.cache.mode, cfg.objective.divergence = "somewhere", "sampled", name
        if name in needs:
            with pytest.raises(ConfigError, match=f"cache.mode=sampled with objective.divergence={name}"):
                validate(cfg)
        else:
            validate(cfg)


def test_report_plots_every_logged_loss_term():
    from kdlm.report.sections import LOSS_TERMS

    names = [name for name, _ in LOSS_TERMS]
    assert names[0] == "loss"
    for spec in registry.OBJECTIVES.values():
        assert set(spec.metrics) <= set(names)
