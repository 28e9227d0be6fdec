"""The teacher-response cache and DDK's teacher-perplexity cache follow the teacher's weights, not its path (issue 15)."""

import shutil

import pytest
from conftest import make_llama, save_model, tiny_config

from kdlm.data import read_examples, tokenize_examples
from kdlm.errors import DataError
from kdlm.generation import fill_teacher_responses
from kdlm.models import load_model
from kdlm.train.mixing import DomainMixer


def _retrain_in_place(folder, tokenizer):
    """Another teacher written into the same folder (as a fine-tuning run saving over its input would)."""
    save_model(folder, make_llama(len(tokenizer), layers=4, seed=7), tokenizer)


def test_teacher_responses_are_regenerated_when_the_teacher_is_retrained_in_place(tiny, tmp_path):
    teacher_dir = shutil.copytree(tiny["teacher"], tmp_path / "teacher")
    cfg = tiny_config(tiny, tmp_path, **{"teacher.name_or_path": str(teacher_dir), "data.responses": "teacher"})
    examples, _ = read_examples(str(tiny["eval"]), cfg.data)
    fill_teacher_responses(cfg, load_model(str(teacher_dir)), tiny["tokenizer"], examples, "eval")
    first = [e.response for e in examples]
    assert all(isinstance(r, str) for r in first)
    # Same weights: served from the cache, no teacher needed.
    again, _ = read_examples(str(tiny["eval"]), cfg.data)
    fill_teacher_responses(cfg, None, tiny["tokenizer"], again, "eval")
    assert [e.response for e in again] == first
    # Retrained in place: the cached responses are another teacher's and must not be served.
    _retrain_in_place(teacher_dir, tiny["tokenizer"])
    stale, _ = read_examples(str(tiny["eval"]), cfg.data)
    with pytest.raises(DataError, match="not cached"):
        fill_teacher_responses(cfg, None, tiny["tokenizer"], stale, "eval")


def _mixer(cfg, tiny, teacher):
    examples, _ = read_examples(str(tiny["train"]), cfg.data)
    items, _ = tokenize_examples(examples, tiny["tokenizer"], max_prompt_length=64, max_length=128)
    return DomainMixer(cfg, items, None, teacher=teacher, vocab_size=len(tiny["tokenizer"]),
                       pad_id=tiny["tokenizer"].pad_token_id, num_processes=1, process_index=0)


def test_ddk_teacher_perplexities_are_remeasured_when_the_teacher_is_retrained_in_place(tiny, tmp_path):
    teacher_dir = shutil.copytree(tiny["teacher"], tmp_path / "teacher")
    cfg = tiny_config(tiny, tmp_path, **{"teacher.name_or_path": str(teacher_dir), "data.mixing.strategy": "ddk",
                                         "data.mixing.val_per_domain": 2})
    measured = _mixer(cfg, tiny, load_model(str(teacher_dir)))._teacher_perplexities()
    assert (measured > 1).all()
    assert _mixer(cfg, tiny, None)._teacher_perplexities().tolist() == measured.tolist()  # cached
    _retrain_in_place(teacher_dir, tiny["tokenizer"])
    with pytest.raises(DataError, match="no teacher is loaded"):
        _mixer(cfg, tiny, None)._teacher_perplexities()
