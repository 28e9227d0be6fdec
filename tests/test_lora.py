"""LoRA students through peft: config, only the adapters train, adapter + merged saves, exact resume."""

import json
import shutil

import pytest
import torch
import yaml
from conftest import make_llama, make_tokenizer, tiny_config
from safetensors.torch import load_file

from kdlm.cli import parse_config
from kdlm.config import Config, ConfigError, LoRAConfig, save_resolved, validate
from kdlm.errors import CheckpointError, ModelError
from kdlm.models import apply_lora, is_peft_model, load_models, save_student
from kdlm.train import loop
from kdlm.train.loop import distill
from kdlm.models import DecoderOnly, OutputHead, unwrap

def _lora(**kwargs) -> dict:
    """A fresh LoRAConfig override per call (dataclass instances are mutable)."""
    base = dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    base.update(kwargs)
    return {"student.lora": LoRAConfig(**base)}


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _batch(vocab: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(7, vocab, (2, 11), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # some left padding
    return ids, mask


def _randomise_adapters(model, seed: int = 0) -> None:
    """LoRA starts as the identity (B = 0); give B values so that the adapters change the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


def _base_state(peft_model) -> dict[str, torch.Tensor]:
    """The frozen weights under the adapters, with the plain model's key names."""
    return {
        key.replace(".base_layer.", "."): value.detach().clone()
        for key, value in peft_model.get_base_model().state_dict().items()
        if "lora_" not in key
    }


# --- configuration -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(r=0), r"student\.lora\.r must be >= 1"),
        (dict(alpha=0.0), r"student\.lora\.alpha must be > 0"),
        (dict(dropout=1.0), r"student\.lora\.dropout must be in \[0, 1\)"),
        (dict(dropout=-0.1), r"student\.lora\.dropout"),
        (dict(target_modules=[]), r"student\.lora\.target_modules must be a non-empty list"),
        (dict(target_modules=["q_proj", "q_proj"]), r"student\.lora\.target_modules must be a non-empty list"),
        (dict(target_modules=["all-linear", "q_proj"]), r"student\.lora\.target_modules: 'all-linear'"),
    ],
)
def test_lora_validation_names_the_key(kwargs, message):
    cfg = Config()
    cfg.student.lora = LoRAConfig(**kwargs)
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def test_lora_defaults_and_command_line_round_trip(tmp_path):
    cfg, _ = parse_config([])
    assert cfg.student.lora is None  # full training unless asked
    default = LoRAConfig()
    assert (default.r, default.alpha, default.dropout) == (16, 32.0, 0.0)
    assert default.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert LoRAConfig().target_modules is not default.target_modules  # a fresh list per instance
    cfg, _ = parse_config(["--student.lora.r", "8", "--student.lora.target_modules", "[q_proj, v_proj]"])
    assert cfg.student.lora == LoRAConfig(r=8, alpha=32.0, dropout=0.0, target_modules=["q_proj", "v_proj"])
    save_resolved(cfg, tmp_path / "resolved.yaml")
    assert yaml.safe_load((tmp_path / "resolved.yaml").read_text())["student"]["lora"]["r"] == 8
    again, _ = parse_config(["--config", str(tmp_path / "resolved.yaml")])
    assert again.student.lora == cfg.student.lora
    with pytest.raises(ConfigError, match=r"student\.lora\.r"):
        parse_config(["--student.lora.r", "0"])


# --- models ----------------------------------------------------------------------------------------------------


def test_load_models_wraps_the_student_in_lora(tiny, tmp_path, caplog):
    cfg = tiny_config(tiny, tmp_path, **_lora())
    with caplog.at_level("INFO", logger="kdlm"):
        models = load_models(cfg)
    student = models.student
    assert is_peft_model(student) and not is_peft_model(models.teacher)
    trainable = {name: p for name, p in student.named_parameters() if p.requires_grad}
    # 2 layers x {q_proj, v_proj} x {lora_A, lora_B}; nothing else trains.
    assert len(trainable) == 8
    assert all(("q_proj" in n or "v_proj" in n) and ("lora_A" in n or "lora_B" in n) for n in trainable)
    hidden, heads, kv_heads = 32, 4, 2
    q_out, v_out = hidden, kv_heads * hidden // heads
    expected = 2 * 4 * ((hidden + q_out) + (hidden + v_out))  # layers * r * (in + out) per adapted linear
    assert sum(p.numel() for p in trainable.values()) == expected
    total = sum(p.numel() for p in student.parameters())
    assert f"{expected} trainable of {total} parameters" in caplog.text
    # The pruned student is not the teacher: the adapter must not claim the teacher's folder as its base.
    assert student.peft_config["default"].base_model_name_or_path is None
    assert not any(p.requires_grad for p in models.teacher.parameters())


def test_unknown_target_module_names_the_key(tiny, tmp_path):
    cfg = tiny_config(tiny, tmp_path, **_lora(target_modules=["q_proj", "qkv_proj"]))
    with pytest.raises(ModelError, match=r"student\.lora\.target_modules") as caught:
        load_models(cfg)
    message = str(caught.value)
    assert "qkv_proj" in message
    assert all(name in message for name in ("q_proj", "k_proj", "down_proj"))  # the available linear layers


@pytest.mark.parametrize("tie, target, what", [(False, "lm_head", "output layer"), (True, "embed_tokens", "tied")])
def test_output_layer_cannot_take_an_adapter(tie, target, what):
    model = make_llama(40, layers=2, tie=tie)
    with pytest.raises(ModelError, match=rf"student\.lora\.target_modules: .*{target}.*{what}"):
        apply_lora(model, LoRAConfig(r=2, target_modules=["q_proj", target]))


def test_decoder_only_and_output_head_see_the_adapters():
    vocab = 40
    plain = make_llama(vocab, layers=2, seed=3)
    ids, mask = _batch(vocab)
    # A plain model: exactly the decoder's last hidden state, as before LoRA existed.
    with torch.no_grad():
        assert torch.equal(DecoderOnly(plain)(ids, mask), plain.model(input_ids=ids, attention_mask=mask).last_hidden_state)
    peft_model = apply_lora(plain, LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    _randomise_adapters(peft_model)
    wrapper = DecoderOnly(peft_model)
    assert unwrap(wrapper).lm is peft_model
    with torch.no_grad():
        hidden = wrapper(ids, mask)
        ours = OutputHead.of(unwrap(wrapper).lm, vocab).logits(hidden)
        reference = peft_model(input_ids=ids, attention_mask=mask).logits
        with peft_model.disable_adapter():
            without = peft_model(input_ids=ids, attention_mask=mask).logits
    assert hidden.shape == (*ids.shape, 32)
    assert torch.allclose(ours, reference, atol=1e-5)
    assert not torch.allclose(ours, without, atol=1e-3)  # the adapters are really in the path


# --- saving ----------------------------------------------------------------------------------------------------


def test_save_student_plain_model(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = make_tokenizer()
    model = make_llama(len(tokenizer), layers=2, seed=4)
    save_student(model, tokenizer, tmp_path / "final")
    assert not (tmp_path / "final" / "adapter").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    saved = load_file(tmp_path / "final" / "model.safetensors")
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert set(saved) <= set(model.state_dict())
    assert AutoTokenizer.from_pretrained(tmp_path / "final").get_vocab() == tokenizer.get_vocab()


def test_save_student_writes_adapter_and_merged_model(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = make_tokenizer()
    vocab = len(tokenizer)
    peft_model = apply_lora(make_llama(vocab, layers=2, seed=5), LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    _randomise_adapters(peft_model, seed=1)
    peft_model.train()
    before = {k: v.detach().clone() for k, v in peft_model.state_dict().items()}
    ids, mask = _batch(vocab, seed=1)
    peft_model.eval()
    with torch.no_grad():
        reference = peft_model(input_ids=ids, attention_mask=mask).logits
    peft_model.train()

    folder = tmp_path / "final"
    save_student(peft_model, tokenizer, folder)
    assert (folder / "adapter" / "adapter_model.safetensors").is_file()
    assert (folder / "adapter" / "adapter_config.json").is_file()
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()

    # The training model is untouched: still LoRA, same tensors, still in training mode.
    assert is_peft_model(peft_model) and peft_model.training
    after = peft_model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)

    merged = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert not any("lora" in key for key in merged.state_dict())
    adapter = PeftModel.from_pretrained(make_llama(vocab, layers=2, seed=5), folder / "adapter").eval()
    with torch.no_grad():
        merged_logits = merged(input_ids=ids, attention_mask=mask).logits
        adapter_logits = adapter(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(merged_logits, reference, atol=1e-5)
    assert torch.allclose(adapter_logits, reference, atol=1e-5)
    assert AutoTokenizer.from_pretrained(folder).get_vocab() == tokenizer.get_vocab()


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_save_student_from_given_full_weights_writes_what_the_model_would(tmp_path, tie):
    """train.parallel fsdp hands save_student the gathered full weights of a sharded LoRA student (its own
    parameters are shards): the folder holds those weights, byte for byte what saving the model itself writes, and
    the model's own parameters are not read (here: zeroed after taking the weights)."""
    tokenizer = make_tokenizer()
    peft_model = apply_lora(make_llama(len(tokenizer), layers=2, seed=5, tie=tie),
                            LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    _randomise_adapters(peft_model, seed=2)
    save_student(peft_model, tokenizer, tmp_path / "own")
    weights = {k: v.detach().clone() for k, v in peft_model.state_dict().items()}
    if tie:  # full_state_dict keeps a tied pair one tensor
        weights["base_model.model.lm_head.weight"] = weights["base_model.model.model.embed_tokens.weight"]
    with torch.no_grad():
        for param in peft_model.parameters():
            param.zero_()
    save_student(peft_model, tokenizer, tmp_path / "given", state_dict=weights)
    for name in ("adapter/adapter_model.safetensors", "model.safetensors"):
        own, given = load_file(tmp_path / "own" / name), load_file(tmp_path / "given" / name)
        assert set(own) == set(given) and own, name
        assert all(torch.equal(own[k], given[k]) for k in own), name
    for name in ("adapter/adapter_config.json", "config.json"):
        assert (json.loads((tmp_path / "own" / name).read_text()) | {"target_modules": None}
                == json.loads((tmp_path / "given" / name).read_text()) | {"target_modules": None}), name


# --- training --------------------------------------------------------------------------------------------------


def test_distill_trains_only_the_adapters_and_saves_adapter_and_merged(tiny, tmp_path, monkeypatch):
    """Needs loop.py's final save to be ``save_student(student_lm, tokenizer, run_dir / "final")``."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    captured = {}

    def capturing_load_models(cfg, **kwargs):
        captured["models"] = load_models(cfg, **kwargs)
        return captured["models"]

    monkeypatch.setattr(loop, "load_models", capturing_load_models)
    cfg = tiny_config(tiny, tmp_path, **_lora(), **{"train.max_steps": 3, "train.lr": 1e-2, "eval.enabled": True,
                                                   "eval.num_samples": 1, "eval.max_new_tokens": 4})
    summary = distill(cfg)
    assert {"before", "after"} <= set(summary)  # evaluation and generation ran on the LoRA student

    fresh = load_models(tiny_config(tiny, tmp_path / "fresh"))  # the same pruned student, without LoRA
    base = {k: v.clone() for k, v in fresh.student.state_dict().items()}
    trained = captured["models"].student
    assert is_peft_model(trained)
    frozen = _base_state(trained)
    assert set(frozen) == set(base)
    for key in base:  # the frozen weights under the adapters did not move
        assert torch.equal(frozen[key], base[key]), key
    lora_b = [p for n, p in trained.named_parameters() if "lora_B" in n]
    assert lora_b and all(float(p.detach().abs().max()) > 0 for p in lora_b)  # the adapters did train

    final = tmp_path / "run" / "final"
    adapter_cfg = json.loads((final / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 4 and adapter_cfg["lora_alpha"] == 8
    assert set(adapter_cfg["target_modules"]) == {"q_proj", "v_proj"}
    merged_disk = load_file(final / "model.safetensors")
    assert not any("lora" in key for key in merged_disk)
    # Only the adapted layers differ from the pruned student; everything else is bit-identical.
    for key, value in merged_disk.items():
        if "q_proj" in key or "v_proj" in key:
            assert not torch.allclose(value, base[key]), key
        else:
            assert torch.equal(value, base[key]), key
    # The merged folder is base + adapter, merged.
    adapter_model = PeftModel.from_pretrained(fresh.student, final / "adapter").eval()
    ids, mask = _batch(fresh.vocab_size, seed=2)
    with torch.no_grad():
        adapter_logits = adapter_model(input_ids=ids, attention_mask=mask).logits
    merged_model = AutoModelForCausalLM.from_pretrained(final).eval()
    with torch.no_grad():
        merged_logits = merged_model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(merged_logits, adapter_logits, atol=1e-5)
    remerged = adapter_model.merge_and_unload().state_dict()
    for key, value in merged_disk.items():
        assert torch.allclose(value, remerged[key], atol=1e-6), key


@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["no_dropout", "dropout"])
def test_lora_checkpoint_holds_the_adapter_and_resume_reproduces_the_next_steps(tiny, tmp_path, dropout):
    """Stop after the step-5 checkpoint (mid-epoch); resume across the epoch boundary; the later losses match.

    With dropout the global RNG stream must also continue exactly where the checkpoint left it.
    """
    common = {"train.max_steps": 10, "train.save_every": 5, "train.log_every": 1, "train.batch_size": 4,
              "train.save_total_limit": 5, "train.lr": 1e-2}
    full = tiny_config(tiny, tmp_path / "full", **common, **_lora(dropout=dropout))
    distill(full)
    reference = _metrics(tmp_path / "full" / "run")
    student_dir = tmp_path / "full" / "run" / "checkpoint-0000005" / "student"
    assert (student_dir / "adapter_model.safetensors").is_file()
    assert not (student_dir / "model.safetensors").exists()  # the frozen base is rebuilt, not stored
    stored = load_file(student_dir / "adapter_model.safetensors")
    assert stored and all("lora_A" in key or "lora_B" in key for key in stored)

    part = tiny_config(tiny, tmp_path / "part", **common, **_lora(dropout=dropout))
    distill(part)
    run = tmp_path / "part" / "run"
    # Pretend the run died after step 5: keep the checkpoint of step 5, drop what came later.
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in reference[:5]))
    shutil.rmtree(run / "checkpoint-0000010")
    shutil.rmtree(run / "final")
    resumed = tiny_config(tiny, tmp_path / "part", **common, **_lora(dropout=dropout), **{"train.resume": True})
    distill(resumed)
    after = _metrics(run)
    assert [m["step"] for m in after] == list(range(1, 11))
    assert after[4]["epoch"] == 0 and after[-1]["epoch"] == 1  # the resumed part crossed into the second (reshuffled) epoch
    for ours, theirs in zip(after[5:], reference[5:]):
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5, abs=1e-6)
    a = load_file(tmp_path / "full" / "run" / "checkpoint-0000010" / "student" / "adapter_model.safetensors")
    b = load_file(run / "checkpoint-0000010" / "student" / "adapter_model.safetensors")
    assert set(a) == set(b) == set(stored)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert not all(torch.equal(a[k], stored[k]) for k in a)  # steps 6-10 changed the adapter


def test_missing_or_mismatched_adapter_is_an_error(tiny, tmp_path):
    cfg = tiny_config(tiny, tmp_path, **_lora(), **{"train.max_steps": 2, "train.save_every": 2})
    distill(cfg)
    checkpoint = tmp_path / "run" / "checkpoint-0000002"

    other_r = tiny_config(tiny, tmp_path, **_lora(r=8), **{"train.max_steps": 3, "train.resume": True})
    with pytest.raises(CheckpointError, match="does not match the student's LoRA layers"):
        distill(other_r)
    more_targets = tiny_config(tiny, tmp_path, **_lora(target_modules=["q_proj", "v_proj", "k_proj"]),
                               **{"train.max_steps": 3, "train.resume": True})
    with pytest.raises(CheckpointError, match="does not match the student's LoRA layers"):
        distill(more_targets)

    (checkpoint / "student" / "adapter_model.safetensors").unlink()
    resume = tiny_config(tiny, tmp_path, **_lora(), **{"train.max_steps": 3, "train.resume": True})
    with pytest.raises(CheckpointError, match=r"student/adapter_model\.safetensors is missing, the manifest says"):
        distill(resume)
