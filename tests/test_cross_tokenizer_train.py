"""Cross-tokenizer distillation wired in: data with both tokenisations, the objective, the loop, the opt-in."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import QA, make_llama, save_model, tiny_config, write_jsonl
from kdlm.config import ConfigError
from kdlm.data.align import collate_pairs, tokenize_pairs
from kdlm.data.sources import Example
from kdlm.errors import ModelError
from kdlm.losses.cross_tokenizer import VocabMap
from kdlm.train.objectives.cross_tokenizer import make_cross_tokenizer_objective
from kdlm.train.loop import distill
from kdlm.models import DecoderOnly
from kdlm.train.objectives import make_objective
from xtok_util import TRAIN_TEXTS, byte_level, metaspace

TEXTS = TRAIN_TEXTS + [f"{p} {r}" for p, r in QA]


def _examples(pairs) -> list[Example]:
    return [Example([{"role": "user", "content": p}], r, "d", f"test:{i}") for i, (p, r) in enumerate(pairs)]


@pytest.fixture(scope="module")
def toks():
    return byte_level(train_texts=TEXTS, vocab_size=300), metaspace(train_texts=TEXTS, vocab_size=420)


def test_paired_data_own_templates_same_response_span(toks):
    student, teacher = toks
    items, counts, stats = tokenize_pairs(_examples(QA), student, teacher, max_prompt_length=64, max_length=128)
    assert counts.kept == len(QA) == stats.aligned and stats.failed == 0
    for item, (prompt, response) in zip(items, QA):
        # Each model its own chat template.
        assert student.decode(item.input_ids[:item.prompt_length]).startswith("<|user|>" + prompt)
        assert teacher.decode(item.teacher_input_ids[:item.teacher_prompt_length]).startswith("[user]: " + prompt)
        # The response mask is the same text on both sides (+ each one's eos).
        s_resp = item.input_ids[item.prompt_length:]
        t_resp = item.teacher_input_ids[item.teacher_prompt_length:]
        assert s_resp[-1] == student.eos_token_id and t_resp[-1] == teacher.eos_token_id
        assert student.decode(s_resp[:-1]) == response == teacher.decode(t_resp[:-1]).strip()
        assert item.labels[:item.prompt_length] == [-100] * item.prompt_length
        # eos pairs with eos; each paired teacher token starts the same text as its student token.
        assert item.pair[-1] == len(t_resp) - 1
        for j, i in enumerate(item.pair[:-1]):
            if i >= 0:
                assert response.endswith(student.decode(s_resp[j:-1]))
                assert response.endswith(teacher.decode(t_resp[i:-1]).strip())


def test_failed_alignments_and_long_prompts_are_dropped_and_counted(toks):
    from tokenizers import normalizers

    student, _ = toks
    teacher = metaspace(train_texts=TEXTS, vocab_size=420)
    teacher.backend_tokenizer.normalizer = normalizers.Replace("!", "")  # '!' is then covered by no teacher token
    examples = _examples([("Say hello.", "Hello there!"), ("Name a fruit.", "An apple is a fruit."),
                          ("word " * 100, "A long prompt.")])
    items, counts, stats = tokenize_pairs(examples, student, teacher, max_prompt_length=64, max_length=128)
    assert [item.origin for item in items] == ["test:1"]
    assert stats.failed == 1 and "test:0" in stats.examples[0] and "'!'" in stats.examples[0]
    assert counts.prompt_too_long == 1 and counts.kept == 1
    assert "1 dropped" in stats.summary("train")


def test_collate_pairs_points_at_the_right_teacher_rows(toks):
    student, teacher = toks
    items, _, _ = tokenize_pairs(_examples(QA[:3]), student, teacher, max_prompt_length=64, max_length=128)
    batch = collate_pairs(items, student.pad_token_id, teacher.pad_token_id)
    width = batch["teacher_input_ids"].shape[1]
    for row, item in enumerate(items):
        for j, i in enumerate(item.pair):
            flat = int(batch["xtok_pair"][row, item.prompt_length + j])
            if i < 0:
                assert flat == -1
                continue
            # The row predicts the teacher token at teacher_prompt_length + i: its next token is that one.
            b, pos = divmod(flat, width - 1)
            assert b == row and batch["teacher_input_ids"][b, pos + 1] == item.teacher_input_ids[item.teacher_prompt_length + i]
    segs = batch["xtok_student_segment"]
    assert len(set(segs[segs >= 0].tolist())) == len(set(batch["xtok_teacher_segment"][batch["xtok_teacher_segment"] >= 0].tolist()))


def test_align_objective_with_one_tokenizer_equals_kd(tiny):
    """The whole path (paired data, collate, objective) with the same tokenizer twice = objective kd, fkl."""
    from kdlm.config import ObjectiveConfig
    from kdlm.data.format import collate, tokenize_examples

    tok = tiny["tokenizer"]
    vocab = len(tok)
    teacher, student_lm = make_llama(vocab, layers=2, seed=5), make_llama(vocab, layers=1, seed=6)
    examples = _examples(QA[:4])
    paired, _, _ = tokenize_pairs(examples, tok, tok, max_prompt_length=64, max_length=128)
    plain, _ = tokenize_examples(examples, tok, max_prompt_length=64, max_length=128)
    cfg = ObjectiveConfig(name="kd", divergence="fkl", kd_ratio=0.5, chunk_size=16, cross_tokenizer="align")
    objective = make_cross_tokenizer_objective(cfg, teacher, vocab, tok, tok, vocab)
    assert objective.vocab_map.identity
    student = DecoderOnly(student_lm)
    got = objective(student, collate_pairs(paired, tok.pad_token_id, tok.pad_token_id))
    got_grads = torch.autograd.grad(got.loss_sum, list(student.parameters()))
    cfg_kd = ObjectiveConfig(name="kd", divergence="fkl", kd_ratio=0.5, chunk_size=16)
    ref = make_objective(cfg_kd, teacher, vocab)(student, collate(plain, tok.pad_token_id))
    ref_grads = torch.autograd.grad(ref.loss_sum, list(student.parameters()))
    assert torch.equal(got.loss_sum, ref.loss_sum)
    assert got.metrics["xtok_aligned"] == sum(len(x.input_ids) - x.prompt_length for x in plain)
    for a, b in zip(got_grads, ref_grads):
        assert torch.equal(a, b)


def _trained_teacher(tokenizer, steps: int = 60):
    """A tiny teacher that knows the QA responses (a few Adam steps of SFT), so its signal is worth distilling."""
    from kdlm.data.format import collate, tokenize_examples

    model = make_llama(len(tokenizer), layers=2, seed=1)
    items, _ = tokenize_examples(_examples(QA), tokenizer, max_prompt_length=64, max_length=128)
    batch = collate(items, tokenizer.pad_token_id)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


@pytest.fixture(scope="module")
def cross_setup(tmp_path_factory, toks):
    student_tok, teacher_tok = toks
    root = tmp_path_factory.mktemp("xtok")
    teacher_dir = save_model(root / "teacher", _trained_teacher(teacher_tok), teacher_tok)
    student_dir = save_model(root / "student", make_llama(len(student_tok), layers=1, seed=2), student_tok)
    train = write_jsonl(root / "train.jsonl", [{"prompt": p, "response": r} for p, r in QA * 4])
    evaluation = write_jsonl(root / "eval.jsonl", [{"prompt": p, "response": r} for p, r in QA[:4]])
    return {"teacher": teacher_dir, "student": student_dir, "train": train, "eval": evaluation}


def _cross_config(setup, tmp_path, **overrides):
    base = {"student.init": "pretrained", "student.name_or_path": str(setup["student"]),
            "objective.cross_tokenizer": "align"}
    tiny = {"teacher": setup["teacher"], "train": setup["train"], "eval": setup["eval"]}
    cfg_overrides = {**base, **overrides}
    # tiny_config sets student.num_layers (unused by a pretrained student) and the data paths.
    return tiny_config(tiny, tmp_path, **cfg_overrides)


def test_mismatched_tokenizers_refused_unless_opted_in(cross_setup, tmp_path):
    cfg = _cross_config(cross_setup, tmp_path, **{"objective.cross_tokenizer": None})
    with pytest.raises(ModelError, match="objective.cross_tokenizer=align"):
        distill(cfg)


def test_config_contradictions_are_named(cross_setup, tmp_path):
    with pytest.raises(ConfigError, match="objective.cross_tokenizer needs student.init=pretrained"):
        tiny_config({"teacher": cross_setup["teacher"], "train": cross_setup["train"], "eval": cross_setup["eval"]},
                    tmp_path, **{"objective.cross_tokenizer": "uld"})
    with pytest.raises(ConfigError, match="objective.uld_weight must be >= 0 and applies to objective.cross_tokenizer=align"):
        _cross_config(cross_setup, tmp_path, **{"objective.cross_tokenizer": "uld", "objective.uld_weight": 0.5})
    with pytest.raises(ConfigError, match="objective.cross_tokenizer applies to objective.name=kd, not .gkd."):
        _cross_config(cross_setup, tmp_path, **{"objective.name": "gkd"})


# align alone (kd_ratio 1, no CE) must teach the student the responses: its signal says which token. ULD compares
# sorted probabilities only, so it cannot say which token; it is trained with CE as in the paper (kd_ratio 0.5).
@pytest.mark.parametrize("method,kd_ratio", [("align", 1.0), pytest.param("uld", 0.5, marks=pytest.mark.slow)])
def test_short_run_lowers_the_loss_and_heldout_ce(cross_setup, tmp_path, method, kd_ratio):
    cfg = _cross_config(cross_setup, tmp_path, **{
        "objective.cross_tokenizer": method, "train.max_steps": 25, "train.log_every": 1, "train.lr": 1e-2,
        "eval.enabled": True, "eval.num_samples": 1, "objective.kd_ratio": kd_ratio})
    summary = distill(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    kd = [r["kd"] for r in rows]
    assert sum(kd[-5:]) / 5 < (0.8 if method == "align" else 0.9) * sum(kd[:5]) / 5  # ULD lives in [0, 2]
    before, after = summary["before"]["overall"], summary["after"]["overall"]
    assert "kl" not in after  # no token-level KL across tokenizers
    assert after["student_ce"] < 0.8 * before["student_ce"]
    assert summary["data"]["alignment"]["train"]["aligned"] == len(QA) * 4
    # The saved student carries the student's tokenizer, not the teacher's.
    saved = json.loads((tmp_path / "run" / "final" / "tokenizer.json").read_text())
    assert saved["model"]["vocab"].keys() == json.loads(cross_setup["student"].joinpath("tokenizer.json").read_text())["model"]["vocab"].keys()
    if method == "align":  # `kdlm eval` of the result: the student's own tokenizer, no token-level KL
        from kdlm.eval.run import evaluate_command

        cfg.eval.gen_max_new_tokens = 4
        result = evaluate_command(cfg, out=str(tmp_path / "eval"))
        assert "kl" not in result["overall"]
        assert result["overall"]["student_ce"] == pytest.approx(after["student_ce"], rel=1e-4)
