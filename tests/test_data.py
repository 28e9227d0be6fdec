"""Reading, templating and masking: the exact token layout and clear errors for bad data."""

import json

import pytest
from conftest import make_tokenizer, write_jsonl

from kdlm.config import DataConfig
from kdlm.data import IGNORE, collate, load_splits, read_examples, render_prompt, tokenize_examples
from kdlm.errors import DataError


def _tok(examples, tokenizer, **kw):
    args = dict(max_prompt_length=64, max_length=128)
    args.update(kw)
    return tokenize_examples(examples, tokenizer, **args)


def test_chat_template_layout_and_prompt_mask(tmp_path):
    tokenizer = make_tokenizer()
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Hi", "response": "Yo"}])
    examples, has = read_examples(str(path), DataConfig())
    assert has
    (item,), counts = _tok(examples, tokenizer)
    prompt = tokenizer("<|user|>Hi<eos><|assistant|>", add_special_tokens=False)["input_ids"]
    response = tokenizer("Yo", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert item.input_ids == prompt + response
    assert item.labels == [IGNORE] * len(prompt) + response
    assert counts.kept == 1


def test_plain_template_without_chat_template(tmp_path):
    tokenizer = make_tokenizer(chat_template=False)
    text = render_prompt(tokenizer, [{"role": "user", "content": "Hi"}])
    assert text == "### User:\nHi\n\n### Assistant:\n"
    assert render_prompt(tokenizer, [{"role": "user", "content": "Hi"}], system_prompt="Be brief.").startswith("### System:\nBe brief.")


def test_messages_format(tmp_path):
    tokenizer = make_tokenizer()
    record = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}
    path = write_jsonl(tmp_path / "m.jsonl", [record])
    (example,), has = read_examples(str(path), DataConfig())
    assert has and example.response == "A" and [m["role"] for m in example.messages] == ["system", "user"]
    (item,), _ = _tok([example], tokenizer)
    n_prompt = len(tokenizer("<|system|>S<eos><|user|>Q<eos><|assistant|>", add_special_tokens=False)["input_ids"])
    assert item.prompt_length == n_prompt and item.labels[n_prompt:] == item.input_ids[n_prompt:]


def test_collate_masks_padding():
    tokenizer = make_tokenizer()
    from kdlm.data import Example

    examples = [Example([{"role": "user", "content": "a"}], "bb", "d", "x:1"), Example([{"role": "user", "content": "aaaa"}], "b", "d", "x:2")]
    items, _ = _tok(examples, tokenizer)
    batch = collate(items, tokenizer.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    padded = batch["attention_mask"] == 0
    assert padded.any() and (batch["labels"][padded] == IGNORE).all()
    assert int((batch["labels"] != IGNORE).sum()) == 3 + 2  # "bb"+eos and "b"+eos


def test_long_prompts_and_empty_responses_are_dropped_and_counted(tmp_path):
    tokenizer = make_tokenizer()
    records = [{"prompt": "x" * 100, "response": "ok"}, {"prompt": "fine", "response": "  "}, {"prompt": "fine", "response": "y" * 200}, {"prompt": "ok", "response": "ok"}]
    examples, _ = read_examples(str(write_jsonl(tmp_path / "d.jsonl", records)), DataConfig())
    items, counts = _tok(examples, tokenizer, max_prompt_length=50, max_length=80)
    assert (counts.kept, counts.prompt_too_long, counts.empty_response, counts.truncated_response) == (2, 1, 1, 1)
    assert max(len(i.input_ids) for i in items) == 80
    assert "d.jsonl:1" in counts.summary("train") and "d.jsonl:2" in counts.summary("train")


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n\n{not json}\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:3: not valid JSON"):
        read_examples(str(path), DataConfig())


def test_missing_field_names_file_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}, {"question": "a", "response": "b"}])
    with pytest.raises(DataError, match=r"d\.jsonl:2: missing field 'prompt'.*question"):
        read_examples(str(path), DataConfig())
    path = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "a"}])
    with pytest.raises(DataError, match=r"e\.jsonl:2: no response \('response'"):
        read_examples(str(path), DataConfig())


def test_bad_messages_are_named(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}]}])
    with pytest.raises(DataError, match=r"m\.jsonl:1: messages\[1\]"):
        read_examples(str(path), DataConfig())


def test_prompt_only_data_goes_to_the_teacher(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": "b"}])
    examples, has = read_examples(str(path), DataConfig())
    assert not has and all(e.response is None for e in examples)
    with pytest.raises(DataError, match="missing field 'response'"):
        read_examples(str(path), DataConfig(responses="dataset"))


def test_parquet_and_saved_dataset(tmp_path):
    import datasets

    records = [{"prompt": f"p{i}", "response": f"r{i}", "domain": "d"} for i in range(5)]
    ds = datasets.Dataset.from_list(records)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "saved_dict"))
    for source in ("d.parquet", "saved", "saved_dict"):
        examples, has = read_examples(str(tmp_path / source), DataConfig())
        assert has and [e.response for e in examples] == [r["response"] for r in records]
    ds.remove_columns(["prompt"]).save_to_disk(str(tmp_path / "noprompt"))
    with pytest.raises(DataError, match=r"noprompt\[0\]: missing field 'prompt'"):
        read_examples(str(tmp_path / "noprompt"), DataConfig())


def test_eval_share_is_carved_and_disjoint(tmp_path):
    records = [{"prompt": f"p{i}", "response": "r"} for i in range(40)]
    cfg = DataConfig(train=str(write_jsonl(tmp_path / "d.jsonl", records)), eval_fraction=0.25, max_eval_examples=None)
    train, evaluation, _ = load_splits(cfg, seed=3)
    assert len(evaluation) == 10 and len(train) == 30
    assert not {e.origin for e in train} & {e.origin for e in evaluation}


def test_builtin_demo_prompts():
    cfg = DataConfig(max_eval_examples=None)
    train, heldout, has = load_splits(cfg, seed=0)
    assert not has and len(train) >= 200 and len(heldout) >= 40
    assert len({e.domain for e in train}) >= 4
    assert not {e.messages[0]["content"] for e in train} & {e.messages[0]["content"] for e in heldout}


# --------------------------------------------------------------------------------------------------------------
# issue 15: non-UTF-8 bytes, partly given responses, a stratified evaluation sample
# --------------------------------------------------------------------------------------------------------------
LATIN1_LINE = b'{"prompt": "caf\xe9", "response": "r"}\n'  # 0xe9 alone is not UTF-8


def test_non_utf8_bytes_name_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "a", "response": "b"}\n\n' + LATIN1_LINE)
    with pytest.raises(DataError, match=r"latin1\.jsonl:3: not UTF-8 .*byte 0xe9 at column 16.*iconv"):
        read_examples(str(path), DataConfig())


def test_non_utf8_bytes_in_plain_text_corpus_name_file_and_line(tmp_path):
    from kdlm.data.sources import read_texts

    path = tmp_path / "lm.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"lm\.jsonl:2: not UTF-8"):
        read_texts(str(path))


def test_some_records_with_responses_and_some_without_is_an_error(tmp_path):
    records = [{"prompt": "a", "response": "b"}, {"prompt": "c"}, {"prompt": "d", "response": "e"}, {"prompt": "f"}]
    path = write_jsonl(tmp_path / "mixed.jsonl", records)
    with pytest.raises(DataError, match=r"mixed\.jsonl:2: no response.*2 of 4 records have one.*data\.responses: teacher.*data\.responses: dataset"):
        read_examples(str(path), DataConfig())
    # The first record without one is named also when the first record has none (the old rule looked only there).
    path = write_jsonl(tmp_path / "mixed2.jsonl", [{"prompt": "c"}, {"prompt": "a", "response": "b"}])
    with pytest.raises(DataError, match=r"mixed2\.jsonl:1: no response.*1 of 2"):
        read_examples(str(path), DataConfig())
    # Choosing explicitly works: the teacher writes all of them, or the dataset's are required.
    examples, has = read_examples(str(path), DataConfig(responses="teacher"))
    assert not has and [e.response for e in examples] == [None, None]
    with pytest.raises(DataError, match=r"mixed2\.jsonl:1: missing field 'response'"):
        read_examples(str(path), DataConfig(responses="dataset"))


def test_max_eval_examples_is_a_seeded_per_domain_sample(tmp_path):
    # 30 examples of domain a first, then 10 of b: the first 8 would all be a. Proportional allocation of 8 over
    # sizes 30 and 10 is exactly 6 and 2.
    records = [{"prompt": f"a{i}", "response": "r", "domain": "a"} for i in range(30)]
    records += [{"prompt": f"b{i}", "response": "r", "domain": "b"} for i in range(10)]
    train = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "x", "response": "y"}])
    cfg = DataConfig(train=str(train), eval=str(write_jsonl(tmp_path / "e.jsonl", records)), max_eval_examples=8)
    _, evaluation, _ = load_splits(cfg, seed=1)
    assert sorted(e.domain for e in evaluation) == ["a"] * 6 + ["b"] * 2
    assert [e.origin for e in evaluation] == sorted((e.origin for e in evaluation), key=lambda o: int(o.rsplit(":", 1)[1]))
    again = [e.origin for e in load_splits(cfg, seed=1)[1]]
    assert again == [e.origin for e in evaluation]
    others = {tuple(e.origin for e in load_splits(cfg, seed=s)[1]) for s in range(2, 6)}
    assert len(others | {tuple(again)}) > 1  # another seed, another sample
    assert [e.domain for e in evaluation] != ["a"] * 8


@pytest.mark.parametrize("key", ["data.eval", "data.mixing.validation", "objective.lm_data"])
def test_non_utf8_bytes_in_any_file_of_a_run_are_one_line_with_file_and_line(key, tiny, tmp_path, capsys):
    from kdlm.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt": "a", "response": "b", "domain": "alpha", "text": "fine text"}\n' + LATIN1_LINE)
    extra = {"data.mixing.validation": ["--data.mixing.strategy", "equal"],
             "objective.lm_data": ["--objective.name", "dpkd"]}.get(key, [])
    argv = ["distill", "--teacher.name_or_path", str(tiny["teacher"]), "--student.num_layers", "2",
            "--data.train", str(tiny["train"]), "--data.eval", str(tiny["eval"]), "--data.max_eval_examples", "null",
            "--data.cache_dir", str(tmp_path / "cache"), "--train.output_dir", str(tmp_path / "run"),
            "--train.max_steps", "1", "--train.batch_size", "4", "--train.progress", "false", "--eval.enabled", "false",
            *extra, f"--{key}", str(bad)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"{bad}:2: not UTF-8" in err and "Traceback" not in err
