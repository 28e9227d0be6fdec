"""Student rollouts (kdlm.train.rollout): masking of sampled completions, left padding, RNG and mode hygiene.

The masking tests stub ``generate`` with hand-written completions; ids there are arbitrary small integers
(0 = pad, 1 = eos, 2 = a second stop token such as ``<|im_end|>``, 10+ = ordinary tokens). Expected batches
are written out by hand.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdlm.data.format import IGNORE, Tokenized, collate, encode_prompt, render_prompt
from kdlm.train.rollout import RolloutStats, sample_responses

from conftest import make_llama, make_tokenizer

X = IGNORE


class StubLM(nn.Module):
    """A model whose ``generate`` appends fixed completions to whatever left-padded prompts it is given."""

    def __init__(self, completions: list[list[int]]):
        super().__init__()
        self.completions = torch.tensor(completions, dtype=torch.long)
        self.calls: list[dict] = []

    def generate(self, *, input_ids, attention_mask, **kwargs):
        self.calls.append({"input_ids": input_ids.clone(), "attention_mask": attention_mask.clone(), **kwargs})
        return torch.cat([input_ids, self.completions], dim=1)


def training_batch(prompts: list[list[int]], responses: list[list[int]] | None = None, pad_id: int = 0):
    """A collate()d batch whose rows are prompt + a dataset response (which sampling must ignore)."""
    responses = responses or [[30, 31, 1] for _ in prompts]
    items = [
        Tokenized(input_ids=p + r, labels=[X] * len(p) + r, prompt_length=len(p), domain="d", origin=f"o{i}")
        for i, (p, r) in enumerate(zip(prompts, responses))
    ]
    return collate(items, pad_id)


def run(stub: StubLM, batch, **kwargs):
    options = dict(max_new_tokens=stub.completions.shape[1], stop_token_ids=[1], pad_token_id=0, seed=0)
    options.update(kwargs)
    return sample_responses(stub, batch, **options)


def assert_batch(out: dict, input_ids, labels, attention_mask, prompt_lengths) -> None:
    assert set(out) == {"input_ids", "labels", "attention_mask", "prompt_lengths"}
    assert out["input_ids"].tolist() == input_ids
    assert out["labels"].tolist() == labels
    assert out["attention_mask"].tolist() == attention_mask
    assert out["prompt_lengths"].tolist() == prompt_lengths
    for value in out.values():
        assert value.dtype == torch.long


# ---------------------------------------------------------------------------------------------------------
# collate's new key
# ---------------------------------------------------------------------------------------------------------


def test_collate_returns_prompt_lengths():
    batch = training_batch([[10, 11, 12], [13]], [[20, 1], [21, 22, 23, 1]])
    assert batch["prompt_lengths"].dtype == torch.long
    assert batch["prompt_lengths"].tolist() == [3, 1]


# ---------------------------------------------------------------------------------------------------------
# Masking, with a stubbed generate
# ---------------------------------------------------------------------------------------------------------


def test_pad_equal_to_eos():
    # generate pads finished rows with eos when pad == eos: only the FIRST eos ends the completion.
    batch = training_batch([[10, 11], [12, 13]], pad_id=1)
    stub = StubLM([[20, 21, 1, 1, 1], [22, 1, 1, 1, 1]])
    out, stats = run(stub, batch, stop_token_ids=[1], pad_token_id=1)
    assert_batch(
        out,
        input_ids=[[10, 11, 20, 21, 1], [12, 13, 22, 1, 1]],
        labels=[[X, X, 20, 21, 1], [X, X, 22, 1, X]],
        attention_mask=[[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]],
        prompt_lengths=[2, 2],
    )
    assert (stats.sequences, stats.generated_tokens, stats.stopped_share) == (2, 5, 1.0)
    assert stats.mean_completion_length == 2.5


def test_several_stop_tokens_stop_at_the_first_of_either():
    batch = training_batch([[10], [11], [12]])
    completions = [[20, 2, 21, 1, 0], [22, 23, 1, 2, 0], [24, 25, 26, 27, 2]]
    out, stats = run(StubLM(completions), batch, stop_token_ids=[1, 2])
    assert_batch(
        out,
        input_ids=[[10, 20, 2, 0, 0, 0], [11, 22, 23, 1, 0, 0], [12, 24, 25, 26, 27, 2]],
        labels=[[X, 20, 2, X, X, X], [X, 22, 23, 1, X, X], [X, 24, 25, 26, 27, 2]],
        attention_mask=[[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]],
        prompt_lengths=[1, 1, 1],
    )
    assert (stats.generated_tokens, stats.stopped_share) == (2 + 3 + 5, 1.0)
    # With eos alone as the stop token, row 0 runs on past the 2 to its eos; row 2 never stops.
    out, stats = run(StubLM(completions), batch, stop_token_ids=[1])
    assert out["labels"].tolist() == [[X, 20, 2, 21, 1, X], [X, 22, 23, 1, X, X], [X, 24, 25, 26, 27, 2]]
    assert (stats.generated_tokens, stats.stopped_share) == (4 + 3 + 5, 2 / 3)


def test_no_stop_token_keeps_every_sampled_token():
    batch = training_batch([[10, 11], [12, 13]])
    out, stats = run(StubLM([[20, 21, 22], [23, 24, 25]]), batch)
    assert_batch(
        out,
        input_ids=[[10, 11, 20, 21, 22], [12, 13, 23, 24, 25]],
        labels=[[X, X, 20, 21, 22], [X, X, 23, 24, 25]],
        attention_mask=[[1] * 5, [1] * 5],
        prompt_lengths=[2, 2],
    )
    assert (stats.generated_tokens, stats.stopped_share, stats.mean_completion_length) == (6, 0.0, 3.0)


def test_immediate_stop_keeps_the_stop_token_labelled():
    batch = training_batch([[10, 11], [12, 13]])
    out, stats = run(StubLM([[1, 0, 0], [20, 21, 1]]), batch)
    assert_batch(
        out,
        input_ids=[[10, 11, 1, 0, 0], [12, 13, 20, 21, 1]],
        labels=[[X, X, 1, X, X], [X, X, 20, 21, 1]],
        attention_mask=[[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]],
        prompt_lengths=[2, 2],
    )
    assert (stats.generated_tokens, stats.stopped_share) == (4, 1.0)


def test_prompts_of_different_lengths_are_left_padded_for_generate():
    # The dataset responses (30..) differ in length and must not leak into the prompts.
    batch = training_batch([[10, 11, 12], [13], [14, 15]], [[30, 1], [31, 32, 33, 34, 1], [35, 1]], pad_id=0)
    stub = StubLM([[20, 1], [21, 1], [22, 23]])
    out, _ = run(stub, batch, temperature=0.7, top_p=0.9, top_k=5, max_new_tokens=2, stop_token_ids=[1, 2])
    (call,) = stub.calls
    assert call["input_ids"].tolist() == [[10, 11, 12], [0, 0, 13], [0, 14, 15]]
    assert call["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert call["max_new_tokens"] == 2
    assert call["eos_token_id"] == [1, 2] and call["pad_token_id"] == 0 and call["use_cache"] is True
    assert call["do_sample"] is True
    assert (call["temperature"], call["top_p"], call["top_k"]) == (0.7, 0.9, 5)
    assert_batch(
        out,
        input_ids=[[10, 11, 12, 20, 1], [13, 21, 1, 0, 0], [14, 15, 22, 23, 0]],
        labels=[[X, X, X, 20, 1], [X, 21, 1, X, X], [X, X, 22, 23, X]],
        attention_mask=[[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]],
        prompt_lengths=[3, 1, 2],
    )


def test_temperature_zero_is_greedy_without_sampling_knobs():
    stub = StubLM([[20, 1]])
    run(stub, training_batch([[10]]), temperature=0.0, top_p=0.5, top_k=3)
    (call,) = stub.calls
    assert call["do_sample"] is False
    assert not {"temperature", "top_p", "top_k"} & set(call)


def test_max_length_truncates_the_completion():
    # max_length 4: row 0 (prompt 3) has room for 1 token, so its eos is cut; row 1 (prompt 1) for 3 tokens.
    batch = training_batch([[10, 11, 12], [13]])
    stub = StubLM([[20, 1, 0], [21, 22, 1]])
    out, stats = run(stub, batch, max_new_tokens=8, max_length=4)
    assert stub.calls[0]["max_new_tokens"] == 3  # no token past the cap of the shortest prompt is sampled
    assert_batch(
        out,
        input_ids=[[10, 11, 12, 20], [13, 21, 22, 1]],
        labels=[[X, X, X, 20], [X, 21, 22, 1]],
        attention_mask=[[1, 1, 1, 1], [1, 1, 1, 1]],
        prompt_lengths=[3, 1],
    )
    assert (stats.generated_tokens, stats.stopped_share) == (4, 0.5)
    with pytest.raises(ValueError, match="no room"):
        run(StubLM([[20]]), batch, max_length=3)


def test_layout_matches_collate_of_the_same_prompt_and_completion():
    prompts = [[10, 11, 12], [13], [14, 15], [16, 17]]
    completions = [[20, 21, 1, 0, 0], [1, 0, 0, 0, 0], [22, 23, 24, 25, 26], [27, 2, 28, 1, 0]]
    kept = [[20, 21, 1], [1], [22, 23, 24, 25, 26], [27, 2]]  # read off by hand: stops are 1 and 2
    out, _ = run(StubLM(completions), training_batch(prompts, pad_id=5), pad_token_id=5, stop_token_ids=[1, 2])
    expected = collate(
        [
            Tokenized(input_ids=p + c, labels=[X] * len(p) + c, prompt_length=len(p), domain="d", origin="x")
            for p, c in zip(prompts, kept)
        ],
        pad_id=5,
    )
    assert set(out) == set(expected)
    for key in expected:
        assert torch.equal(out[key], expected[key]), key


def test_rejects_bad_arguments():
    batch = training_batch([[10]])
    with pytest.raises(KeyError, match="prompt_lengths"):
        run(StubLM([[1]]), {"input_ids": batch["input_ids"]})
    with pytest.raises(ValueError, match="stop_token_ids"):
        run(StubLM([[1]]), batch, stop_token_ids=[])
    with pytest.raises(ValueError, match="max_new_tokens"):
        run(StubLM([[1]]), batch, max_new_tokens=0)
    bad = dict(batch, prompt_lengths=torch.tensor([0]))
    with pytest.raises(ValueError, match="prompt_lengths"):
        run(StubLM([[1]]), bad)


# ---------------------------------------------------------------------------------------------------------
# A real tiny model
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real():
    tokenizer = make_tokenizer()
    model = make_llama(len(tokenizer), layers=2, seed=3)
    questions = ["What colour is the sky?", "Hi", "Name a fruit, please."]
    items = []
    for i, question in enumerate(questions):
        prompt = encode_prompt(tokenizer, render_prompt(tokenizer, [{"role": "user", "content": question}]))
        response = tokenizer("ok", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        items.append(Tokenized(prompt + response, [X] * len(prompt) + response, len(prompt), "d", f"o{i}"))
    return model, tokenizer, collate(items, tokenizer.pad_token_id)


def sample_real(real, **kwargs):
    model, tokenizer, batch = real
    options = dict(
        max_new_tokens=12, temperature=1.0, stop_token_ids=[tokenizer.eos_token_id],
        pad_token_id=tokenizer.pad_token_id, seed=0,
    )
    options.update(kwargs)
    return sample_responses(model, batch, **options)


def test_real_model_same_seed_same_samples_different_seed_different_samples(real):
    torch.manual_seed(111)
    a, _ = sample_real(real, seed=7)
    torch.manual_seed(222)  # the caller's RNG state must not matter, only the seed
    b, _ = sample_real(real, seed=7)
    c, _ = sample_real(real, seed=8)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert not torch.equal(a["input_ids"], c["input_ids"])


def test_real_model_greedy_ignores_the_seed(real):
    a, _ = sample_real(real, temperature=0.0, seed=1)
    b, _ = sample_real(real, temperature=0.0, seed=2)
    assert torch.equal(a["input_ids"], b["input_ids"])


def test_real_model_leaves_the_global_rng_alone(real):
    torch.manual_seed(5)
    state = torch.get_rng_state()
    expected_next = torch.rand(4)
    torch.set_rng_state(state)
    sample_real(real, seed=99)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(torch.rand(4), expected_next)


def test_real_model_batch_layout(real):
    model, tokenizer, batch = real
    out, stats = sample_real(real, seed=3)
    eos = tokenizer.eos_token_id
    assert torch.equal(out["prompt_lengths"], batch["prompt_lengths"])
    total = 0
    for row in range(out["input_ids"].shape[0]):
        p = int(batch["prompt_lengths"][row])
        length = int(out["attention_mask"][row].sum())
        assert out["attention_mask"][row, :length].eq(1).all() and out["attention_mask"][row, length:].eq(0).all()
        assert torch.equal(out["input_ids"][row, :p], batch["input_ids"][row, :p])  # the prompt, unchanged
        completion = out["input_ids"][row, p:length].tolist()
        assert out["labels"][row, p:length].tolist() == completion
        assert out["labels"][row, :p].eq(X).all() and out["labels"][row, length:].eq(X).all()
        assert 1 <= len(completion) <= 12
        assert eos not in completion[:-1]  # nothing is kept after the first eos
        assert completion[-1] == eos or len(completion) == 12
        total += len(completion)
    assert stats.generated_tokens == total and stats.sequences == 3
    assert stats.wall_seconds > 0 and stats.tokens_per_s == pytest.approx(total / stats.wall_seconds)


def test_real_model_max_length(real):
    _, _, batch = real
    cap = int(batch["prompt_lengths"].max()) + 2
    out, _ = sample_real(real, max_length=cap, seed=4)
    assert int(out["attention_mask"].sum(1).max()) <= cap
    assert (out["attention_mask"].sum(1) - batch["prompt_lengths"]).ge(1).all()


@pytest.mark.parametrize("training", [True, False])
def test_real_model_mode_restored_and_no_grad(real, training):
    model, _, _ = real
    model.train(training)
    seen = {}
    original = type(model).generate

    def spying_generate(*args, **kwargs):
        seen["training"] = model.training
        seen["grad"] = torch.is_grad_enabled()
        return original(model, *args, **kwargs)

    model.generate = spying_generate
    try:
        with torch.enable_grad():
            out, _ = sample_real(real, seed=1)
    finally:
        del model.generate
    assert seen == {"training": False, "grad": False}
    assert model.training is training
    assert all(not value.requires_grad for value in out.values())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("training", [True, False])
def test_real_model_mode_restored_when_generate_raises(real, training):
    model, _, _ = real
    model.train(training)

    def failing_generate(*args, **kwargs):
        assert not model.training
        raise RuntimeError("out of memory (simulated)")

    model.generate = failing_generate
    try:
        with pytest.raises(RuntimeError, match="simulated"):
            sample_real(real, seed=1)
    finally:
        del model.generate
    assert model.training is training
    model.eval()


def test_stats_metrics_names():
    stats = RolloutStats(2, 5, 2.5, 1.0, 0.5, 10.0)
    assert stats.as_metrics() == {
        "rollout/sequences": 2.0, "rollout/generated_tokens": 5.0, "rollout/mean_completion_length": 2.5,
        "rollout/stopped_share": 1.0, "rollout/wall_seconds": 0.5, "rollout/tokens_per_s": 10.0,
    }
