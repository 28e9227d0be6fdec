"""Slow tier: the vLLM sampling engine serving the pruned demo student (9 of SmolLM2-135M-Instruct's 30 layers; the
tiny test models' heads are too small for vLLM's CPU attention). One server for the module.

* its samples follow the student's distribution (first-token frequencies of 400 draws against kdlm's float32
  softmax: per-token binomial bounds and a chi-square test, which the same draws fail against a wrong reference);
* after a weight update its log-probs match kdlm's forward of the UPDATED student, not the old one;
* a short GKD run samples through it, pushes the weights of every step, and the server ends with the last push.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from kdlm.config import DEMO_TEACHER, Config, validate
from kdlm.models import default_keep_layers, load_model, load_tokenizer, prune_from_teacher

pytestmark = pytest.mark.slow

TOLERANCE = 1e-3  # float32 log-probs of vLLM's CPU kernels vs transformers' eager forward: 4e-5 seen


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The pruned demo student (as kdlm builds it), its tokenizer, and a VLLMEngine serving it (version 0)."""
    from kdlm.train.vllm_engine import VLLMEngine

    teacher = load_model(DEMO_TEACHER)
    student = prune_from_teacher(teacher, default_keep_layers(teacher.config.num_hidden_layers, 9)).eval()
    del teacher
    tokenizer = load_tokenizer(DEMO_TEACHER)
    engine = VLLMEngine(max_model_len=512, log_path=tmp_path_factory.mktemp("vllm") / "server.log")
    engine.sync(student, 0, tokenizer)
    try:
        yield {"student": student, "tokenizer": tokenizer, "engine": engine}
    finally:
        engine.close()


def _logprobs(model, ids: list[int]) -> torch.Tensor:
    """kdlm's reference: log p(ids[t] | ids[:t]) for t >= 1 from the model's float32 forward."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, -1)[:-1].gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)


def _chi_square(counts: dict[int, int], probs: torch.Tensor, n: int) -> tuple[float, int]:
    """Pearson's statistic over the tokens expected >= 5 times plus one bin for the rest; its degrees of freedom."""
    bins = [int(i) for i in torch.nonzero(probs * n >= 5).flatten()]
    observed = [counts.get(i, 0) for i in bins] + [n - sum(counts.get(i, 0) for i in bins)]
    expected = [float(probs[i]) * n for i in bins] + [n * (1 - float(probs[bins].sum()))]
    return sum((o - e) ** 2 / e for o, e in zip(observed, expected) if e > 0), len(bins)


def _chi_square_bound(df: int, z: float = 4.75) -> float:
    """Wilson-Hilferty upper quantile of chi-square(df) at the normal quantile z (4.75: tail ~1e-6)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def test_samples_follow_the_students_distribution(demo):
    from kdlm.train.rollout import SamplingSettings, sample_window

    student, tokenizer, engine = demo["student"], demo["tokenizer"], demo["engine"]
    prefix = tokenizer("My favourite animal is the")["input_ids"]
    n = 400
    with torch.no_grad():
        probs = torch.softmax(student(torch.tensor([prefix])).logits[0, -1].float(), -1)
    batch = {"input_ids": torch.tensor([prefix] * n), "prompt_lengths": torch.full((n,), len(prefix))}
    settings = SamplingSettings(max_new_tokens=1, temperature=1.0, top_p=1.0, top_k=0,
                                stop_token_ids=(tokenizer.eos_token_id,), pad_token_id=tokenizer.pad_token_id)
    [out], _ = sample_window(student, [batch], [list(range(7, 7 + n))], settings,
                             engine=engine.engine(version=0, tokenizer=tokenizer))
    first = out["input_ids"][:, len(prefix)]
    counts: dict[int, int] = {}
    for token in first.tolist():
        counts[token] = counts.get(token, 0) + 1
    # Every token expected >= 5 times: its count within 4.5 binomial sigmas of n * p (the rarer ones share the
    # chi-square's last bin; a normal bound on them would be wrong).
    for token in [int(i) for i in torch.nonzero(probs * n >= 5).flatten()]:
        p = float(probs[token])
        assert abs(counts.get(token, 0) - n * p) <= 4.5 * math.sqrt(n * p * (1 - p)), (token, counts.get(token), p)
    assert all(float(probs[token]) > 0 for token in counts)
    statistic, df = _chi_square(counts, probs, n)
    assert df >= 3, "the prefix's distribution is too peaked to test"
    assert statistic < _chi_square_bound(df), (statistic, df)
    # Power: the same draws against the student at temperature 0.5 are rejected.
    sharper = torch.softmax(torch.log(probs) / 0.5, -1)
    wrong, wrong_df = _chi_square(counts, sharper, n)
    assert wrong > _chi_square_bound(wrong_df), (wrong, wrong_df)
    # The engine's log-prob of each sampled token is the student's own (temperature 1).
    column = out["sample_logprobs"][:, len(prefix)]
    assert torch.allclose(column, torch.log(probs[first]), atol=TOLERANCE)


def test_weights_follow_an_update(demo):
    student, tokenizer, engine = demo["student"], demo["tokenizer"], demo["engine"]
    ids = tokenizer("The capital of France is Paris, and the capital of Germany is Berlin.")["input_ids"]
    before = torch.tensor(engine.prompt_logprobs(ids))
    assert torch.allclose(before, _logprobs(student, ids), atol=TOLERANCE)
    updated = copy.deepcopy(student)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # every tensor moves, the (tied) embeddings too
        for param in updated.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.02)
    pushes = engine.pushes
    engine.sync(updated, 1, tokenizer)
    engine.sync(updated, 1, tokenizer)  # same version: no second push
    assert engine.pushes == pushes + 1
    after = torch.tensor(engine.prompt_logprobs(ids))
    reference = _logprobs(updated, ids)
    assert torch.allclose(after, reference, atol=TOLERANCE), (after - reference).abs().max()
    assert (after - before).abs().max() > 0.1  # the update is visible: the old weights would fail the line above
    engine.sync(student, 2, tokenizer)  # back to the fixture's student for the other tests
    assert torch.allclose(torch.tensor(engine.prompt_logprobs(ids)), before, atol=TOLERANCE)


def test_gkd_run_samples_through_the_engine(demo, tmp_path, monkeypatch):
    import kdlm.train.vllm_engine as engine_module
    from kdlm.train.loop import distill

    engine, tokenizer = demo["engine"], demo["tokenizer"]
    engine.version = None  # the run's first sample pushes its own student
    monkeypatch.setattr(engine_module, "VLLMEngine", lambda **kwargs: engine)  # share the module's server
    pushed, sampled = [], []
    export = engine_module.export_weights

    def spy_export(model, folder):
        pushed.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        export(model, folder)

    complete = engine.complete

    def spy_complete(prompts, seeds, **settings):
        sampled.append((len(prompts), settings))
        return complete(prompts, seeds, **settings)

    monkeypatch.setattr(engine_module, "export_weights", spy_export)
    monkeypatch.setattr(engine, "complete", spy_complete)

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "response": "I do not know."}) + "\n"
                            for p in ["Name a colour.", "Name a fruit.", "Name a city.", "Name a tree."]))
    cfg = Config()
    cfg.data.train, cfg.data.responses = str(data), "dataset"
    cfg.data.max_prompt_length, cfg.data.max_length = 64, 128
    # data.cache_dir stays kdlm's cache: the demo teacher is de-quantised there once (as for the fixture above)
    cfg.eval.enabled = False
    cfg.objective.name, cfg.objective.lmbda = "gkd", 1.0
    cfg.objective.sampling.engine, cfg.objective.sampling.max_new_tokens = "vllm", 12
    cfg.objective.sampling.temperature = 1.0
    cfg.train.output_dir, cfg.train.max_steps, cfg.train.batch_size, cfg.train.lr = str(tmp_path / "run"), 2, 2, 1e-3
    cfg.train.progress, cfg.train.warmup_ratio = False, 0.0  # (a warm-up step would have lr 0: no update)
    distill(validate(cfg))

    assert len(sampled) == 2 and all(rows >= 1 for rows, _ in sampled)  # every step's rollouts: the engine
    assert all(s["max_new_tokens"] == 12 and s["temperature"] == 1.0 for _, s in sampled)
    assert len(pushed) == 2 and engine.version == 1  # one push per optimizer step that sampled
    name = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(pushed[0][name], demo["student"].state_dict()[name])  # step 0: the pruned start
    assert not torch.equal(pushed[1][name], pushed[0][name])  # step 1: the student after one update
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert {s["from"] for s in samples} == {"student"} and {s["step"] for s in samples} == {0, 1}
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert losses and all(math.isfinite(v) for v in losses)
    # The server holds the last pushed weights (those the last step sampled with).
    last = copy.deepcopy(demo["student"])
    last.load_state_dict(pushed[1])
    ids = tokenizer("Name a colour. Blue is a colour.")["input_ids"]
    assert torch.allclose(torch.tensor(engine.prompt_logprobs(ids)), _logprobs(last, ids), atol=TOLERANCE)
