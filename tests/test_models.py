"""Models: tokenizer check, padded output rows, pruning from the teacher."""

import pytest
import torch
from conftest import make_llama, make_tokenizer, save_model, tiny_config

from kdlm import losses
from kdlm.data import collate, read_examples, tokenize_examples
from kdlm.errors import ModelError
from kdlm.models import check_same_tokenizer, default_keep_layers, load_models, prune_from_teacher
from kdlm.models import DecoderOnly
from kdlm.train.objectives import make_objective


def test_same_tokenizer_passes_and_gives_vocab_size():
    assert check_same_tokenizer(make_tokenizer(), make_tokenizer()) == len(make_tokenizer())


def test_different_vocabulary_is_refused():
    with pytest.raises(ModelError, match="tokenizers differ.*only in student: \\['é'\\]"):
        check_same_tokenizer(make_tokenizer(), make_tokenizer(extra_chars="é"))


def test_different_special_tokens_are_refused():
    other = make_tokenizer()
    other.eos_token = "<bos>"
    with pytest.raises(ModelError, match="special tokens differ"):
        check_same_tokenizer(make_tokenizer(), other)


def test_refused_at_load_time(tiny, tmp_path):
    other = make_tokenizer(extra_chars="éü")
    folder = save_model(tmp_path / "other", make_llama(len(other), layers=2), other)
    cfg = tiny_config(tiny, tmp_path, **{"student.init": "pretrained", "student.name_or_path": str(folder)})
    with pytest.raises(ModelError, match="tokenizers differ"):
        load_models(cfg)


def test_padded_output_rows_are_sliced(tiny, tmp_path):
    """A teacher with 9 padded output rows: the loss must equal the loss over the real vocabulary only."""
    tokenizer = tiny["tokenizer"]
    vocab = len(tokenizer)
    teacher = make_llama(vocab + 9, layers=2, seed=5)
    with torch.no_grad():  # padded rows that would dominate the softmax if they were not sliced off
        teacher.lm_head.weight[vocab:] = 5.0
    teacher_dir = save_model(tmp_path / "padded", teacher, tokenizer)
    cfg = tiny_config(tiny, tmp_path, **{"teacher.name_or_path": str(teacher_dir), "student.init": "pretrained",
                                        "student.name_or_path": str(tiny["student"]), "objective.kd_ratio": 1.0})
    models = load_models(cfg)
    assert models.vocab_size == vocab
    examples, _ = read_examples(str(tiny["train"]), cfg.data)
    items, _ = tokenize_examples(examples[:4], tokenizer, max_prompt_length=64, max_length=128)
    batch = collate(items, tokenizer.pad_token_id)
    loss = make_objective(cfg.objective, models.teacher, models.vocab_size)(DecoderOnly(models.student), batch).loss_sum
    with torch.no_grad():
        s_logits = models.student(batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        t_logits = models.teacher(batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    mask = batch["labels"][:, 1:] != -100
    expected = losses.fkl(s_logits[mask], t_logits[mask][:, :vocab]).sum()
    unsliced = losses.fkl(torch.cat([s_logits[mask], torch.full((int(mask.sum()), 9), -1e4)], -1), t_logits[mask]).sum()
    assert torch.allclose(loss, expected, rtol=1e-4)
    assert not torch.allclose(expected, unsliced, rtol=1e-2)


def test_default_keep_layers():
    assert default_keep_layers(30, 9) == [0, 4, 7, 11, 14, 18, 22, 25, 29]
    assert default_keep_layers(4, 2) == [0, 3]
    assert default_keep_layers(5, 1) == [0]
    with pytest.raises(ModelError, match="num_layers=31"):
        default_keep_layers(30, 31)


@pytest.mark.parametrize("tie", [False, True])
def test_pruning_copies_the_kept_layers(tie):
    teacher = make_llama(50, layers=5, seed=3, tie=tie).eval()
    student = prune_from_teacher(teacher, [0, 2, 4]).eval()
    assert student.config.num_hidden_layers == 3 and len(student.model.layers) == 3
    for new, old in enumerate([0, 2, 4]):
        for (name, p_new), (_, p_old) in zip(student.model.layers[new].named_parameters(), teacher.model.layers[old].named_parameters()):
            assert torch.equal(p_new, p_old), name
        assert student.model.layers[new].self_attn.layer_idx == new  # KV-cache slot renumbered
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)
    assert torch.equal(student.model.norm.weight, teacher.model.norm.weight)
    # Keeping every layer reproduces the teacher exactly; generation with the KV cache works.
    full = prune_from_teacher(teacher, list(range(5))).eval()
    ids = torch.randint(3, 50, (2, 7))
    assert torch.allclose(full(ids).logits, teacher(ids).logits, atol=1e-6)
    out = student.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 10)


def test_pruning_rejects_bad_indices():
    with pytest.raises(ModelError, match="out of range"):
        prune_from_teacher(make_llama(50, layers=3), [0, 3])


def test_trust_remote_code_is_off_by_default():
    from kdlm.config import StudentConfig, TeacherConfig

    assert TeacherConfig().trust_remote_code is False and StudentConfig().trust_remote_code is False


# --------------------------------------------------------------------------------------------------------------
# issue 15: a GGUF-derived teacher folder has a plain config (no quantization_config)
# --------------------------------------------------------------------------------------------------------------
def test_gguf_conversion_writes_a_plain_config(tiny, tmp_path, monkeypatch):
    import json

    import transformers

    from kdlm.models import _gguf_cache_dir, _materialise_gguf, load_model

    quant = {"quant_method": "gguf", "dequantize": False, "gguf_file": "m.gguf"}

    class FakeGGUFLoader:  # what transformers' gguf_file= path returns: a model whose config keeps quantization_config
        from_config = staticmethod(transformers.AutoModelForCausalLM.from_config)

        @staticmethod
        def from_pretrained(folder, gguf_file=None, dtype=None):
            model = make_llama(len(tiny["tokenizer"]), layers=2, seed=3)
            model.config.quantization_config = dict(quant)
            return model

    class FakeTokenizerLoader:
        @staticmethod
        def from_pretrained(folder, gguf_file=None):
            return tiny["tokenizer"]

    monkeypatch.setattr(transformers, "AutoModelForCausalLM", FakeGGUFLoader)
    monkeypatch.setattr(transformers, "AutoTokenizer", FakeTokenizerLoader)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "m.gguf").write_bytes(b"GGUF stand-in")
    folder = _materialise_gguf(str(tmp_path / "src"), "m.gguf", str(tmp_path / "cache"))
    monkeypatch.undo()
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    model = load_model(str(folder))
    assert getattr(model.config, "quantization_config", None) is None
    model.save_pretrained(tmp_path / "finetuned")  # a GGUF-loaded (quantised) model refuses this

    # A folder converted by an earlier kdlm (config.json with quantization_config) is made plain on its next use.
    stale = _gguf_cache_dir(str(tmp_path / "src"), "m.gguf", str(tmp_path / "cache"))
    config = json.loads((stale / "config.json").read_text())
    (stale / "config.json").write_text(json.dumps({**config, "quantization_config": quant}))
    assert _materialise_gguf(str(tmp_path / "src"), "m.gguf", str(tmp_path / "cache")) == stale
    assert "quantization_config" not in json.loads((stale / "config.json").read_text())


def _cut_short(path):
    """A weights file cut in half, as an interrupted download or copy leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_damaged_weights_file_is_named_by_the_cli(tiny, tmp_path, capsys):
    """A teacher folder whose model.safetensors was cut short: `kdlm distill` exits with an error that names the file
    and says what to do (safetensors' own error names none), without a traceback and before writing a run."""
    import shutil

    from kdlm.cli import main

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny["teacher"], teacher)
    _cut_short(teacher / "model.safetensors")
    out = tmp_path / "run"
    code = main(["distill", "--teacher.name_or_path", str(teacher), "--student.num_layers", "2",
                 "--data.train", str(tiny["train"]), "--train.output_dir", str(out), "--train.max_steps", "1",
                 "--eval.enabled", "false", "--train.progress", "false"])
    err = capsys.readouterr().err
    assert code != 0
    assert f"{teacher / 'model.safetensors'}" in err and "damaged or incomplete" in err and "again" in err
    assert "Traceback" not in err
    assert not (out / "final").exists()


def test_file_weights_name_a_damaged_file(tiny, tmp_path):
    """The shard-loading path reads the files itself (kdlm.models.FileWeights): the same error, naming the file."""
    import shutil

    from kdlm.models import FileWeights

    folder = tmp_path / "teacher"
    shutil.copytree(tiny["teacher"], folder)
    whole = FileWeights([folder / "model.safetensors"], torch.float32)
    assert len(whole) > 0
    _cut_short(folder / "model.safetensors")
    with pytest.raises(ModelError, match="damaged or incomplete") as info:
        FileWeights([folder / "model.safetensors"], torch.float32)
    assert str(folder / "model.safetensors") in str(info.value)


def test_a_damaged_hub_model_is_a_model_error(monkeypatch):
    """A hub model's files live in the hub cache, not in a folder kdlm was given, so the damaged file cannot be
    named: still a ModelError that names the model and says what to do, not safetensors' bare error."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    from kdlm.models import load_model

    def damaged(*args, **kwargs):
        raise SafetensorError("Error while deserializing header: incomplete metadata, file not fully covered")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", damaged)
    with pytest.raises(ModelError, match="cannot load model 'someone/model': a weights file cannot be read") as info:
        load_model("someone/model")
    assert "download the model again" in str(info.value)
