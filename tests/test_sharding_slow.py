"""train.parallel fsdp (PyTorch FSDP2 on student and teacher), 2 gloo processes on CPU, tiny models. Slow tier.

The references are independent runs: one process with the double batch (no sharding at all) and the same two
processes under ddp. The models are a tiny Llama with *tied* embeddings (the case FSDP can silently untie) and a
vocabulary padded past the tokenizer's (rows the loss must slice off).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_llama, save_model, tiny_config
from safetensors.torch import load_file
from test_distributed_slow import _launch, _metrics

from kdlm.config import save_resolved
from kdlm.train.loop import distill

pytestmark = pytest.mark.slow

PADDED_ROWS = 8  # output-layer rows past the tokenizer's vocabulary


@pytest.fixture(scope="module")
def tied(tiny, tmp_path_factory):
    """A 4-layer teacher with tied embeddings and a padded vocabulary; the student is pruned from it (2 layers)."""
    root = tmp_path_factory.mktemp("tied")
    tokenizer = tiny["tokenizer"]
    teacher = make_llama(len(tokenizer) + PADDED_ROWS, layers=4, seed=3, tie=True)
    assert teacher.lm_head.weight is teacher.model.embed_tokens.weight
    return {**tiny, "teacher": save_model(root / "teacher", teacher, tokenizer)}


def _run(tied, folder: Path, processes: int, *extra: str, **overrides) -> Path:
    """distill with ``overrides`` on 1 process (in this one) or on ``processes`` under torchrun; the run folder."""
    cfg = tiny_config(tied, folder, **{"train.max_steps": 4, "train.log_every": 1, **overrides})
    if processes == 1:
        distill(cfg)
    else:
        save_resolved(cfg, folder.with_suffix(".yaml"))
        result = _launch(folder.with_suffix(".yaml"), processes, *extra)
        assert result.returncode == 0, result.stderr[-4000:]
    return folder / "run"


OBJECTIVES = {
    "kd": {"objective.name": "kd", "objective.divergence": "fkl"},
    "rlkd": {"objective.name": "rlkd"},
    "gkd": {"objective.name": "gkd", "objective.lmbda": 1.0, "objective.sampling.max_new_tokens": 5,
            "objective.sampling.temperature": 0.0},
}


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_fsdp_two_processes_equal_one_process_double_batch_and_ddp(tied, tmp_path, name):
    """fsdp 2 × batch 2 = 1 process × batch 4 = ddp 2 × batch 2: per-step losses (rel 1e-5) and final weights (1e-5).

    gkd samples greedily (temperature 0) from the student every step, so its rollouts need the gathered student
    and are the same whichever process draws them."""
    common = {**OBJECTIVES[name], "train.grad_accum": 2}
    one = _run(tied, tmp_path / "one", 1, **common, **{"train.batch_size": 4})
    fsdp = _run(tied, tmp_path / "fsdp", 2, **common, **{"train.batch_size": 2, "train.parallel": "fsdp"})
    ddp = _run(tied, tmp_path / "ddp", 2, **common, **{"train.batch_size": 2, "train.parallel": "ddp"})
    reference = _metrics(one)
    assert len(reference) == 4
    for other in (fsdp, ddp):
        got = _metrics(other)
        assert [m["response_tokens"] for m in got] == [m["response_tokens"] for m in reference]
        for a, b in zip(reference, got):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    wa = load_file(one / "final" / "model.safetensors")
    for other in (fsdp, ddp):
        wb = load_file(other / "final" / "model.safetensors")
        assert set(wb) == set(wa)
        for key in wa:
            assert torch.allclose(wa[key], wb[key], atol=1e-5), key
    first = load_file(tied["teacher"] / "model.safetensors")
    moved = [k for k in wa if k in first and wa[k].shape == first[k].shape and not torch.equal(wa[k], first[k])]
    assert moved, "training changed no weight: the comparison would be vacuous"


@pytest.mark.parametrize("name", ["kd", "gkd"])
def test_fsdp_keeping_layers_gathered_until_the_backward_equals_one_process(tied, tmp_path, name):
    """train.fsdp_reshard_after_forward false (the student's layers stay gathered from forward to backward, and
    gkd samples from the gathered student in between): the same losses and weights as 1 process × the double batch."""
    common = {**OBJECTIVES[name], "train.grad_accum": 2}
    one = _run(tied, tmp_path / "one", 1, **common, **{"train.batch_size": 4})
    kept = _run(tied, tmp_path / "kept", 2, **common, **{"train.batch_size": 2, "train.parallel": "fsdp",
                                                         "train.fsdp_reshard_after_forward": False})
    for a, b in zip(_metrics(one), _metrics(kept), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
    wa, wb = load_file(one / "final" / "model.safetensors"), load_file(kept / "final" / "model.safetensors")
    assert set(wa) == set(wb) and all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_fsdp_shards_hold_half_of_each_model_and_keep_the_tie(tied, tmp_path):
    """Process 0's parameter shards are about half of each full model (2 processes), teacher and student, and the
    student's output layer is still its input embedding (sharding a submodule alone would have untied them)."""
    run = _run(tied, tmp_path / "fsdp", 2, **{"train.batch_size": 2, "train.parallel": "fsdp", "train.max_steps": 1})
    report = json.loads((run / "summary.json").read_text())["sharding"]
    for model in ("student", "teacher"):
        local, full = report[f"{model}_local_bytes"], report[f"{model}_full_bytes"]
        assert 0.45 * full <= local <= 0.55 * full, (model, local, full)
    assert report["student_tied"] and report["teacher_tied"]
    # loaded straight into its shards: process 0 read its own rows of the teacher from the file, not the whole
    assert report["teacher_read_bytes"] == report["teacher_local_bytes"]
    # and the full model's size is the tied one's: embedding and output layer counted once
    teacher = load_file(tied["teacher"] / "model.safetensors")
    assert report["teacher_full_bytes"] == sum(t.numel() * t.element_size() for t in teacher.values())


def test_fsdp_kill_inside_accumulation_window_then_resume_is_exact(tied, tmp_path, monkeypatch):
    """SIGKILL of a process inside a gradient-accumulation window of the second epoch under fsdp; --resume from the
    sharded checkpoint (torch.distributed.checkpoint) repeats the uninterrupted run's losses and weights; the
    consolidated final folder loads with from_pretrained and gives the logits of the last sharded checkpoint,
    consolidated independently by torch's dcp_to_torch_save (the final step is a checkpoint step)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from transformers import AutoModelForCausalLM

    common = {"train.max_steps": 9, "train.grad_accum": 2, "train.batch_size": 2, "train.save_every": 3,
              "train.save_total_limit": 10, "train.parallel": "fsdp"}
    reference = _metrics(_run(tied, tmp_path / "full", 2, **common))
    # 32 examples / (2 processes x 2 x 2) = 4 steps per epoch; micro-batch 15 is the first half of step 8 (epoch 1).
    cfg = tiny_config(tied, tmp_path / "killed", **{"train.log_every": 1, **common})
    save_resolved(cfg, tmp_path / "killed.yaml")
    monkeypatch.setenv("KDLM_FAULT_KILL_AFTER_MICROBATCHES", "15")
    killed = _launch(tmp_path / "killed.yaml", 2)
    monkeypatch.delenv("KDLM_FAULT_KILL_AFTER_MICROBATCHES")
    run = tmp_path / "killed" / "run"
    assert killed.returncode != 0
    checkpoints = sorted(p.name for p in run.glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-0000003", "checkpoint-0000006"] and not (run / "final").exists()
    manifest = json.loads((run / "checkpoint-0000006" / "manifest.json").read_text())
    assert manifest["parallel"] == "fsdp"
    assert {"sharded/.metadata", "sharded/__0_0.distcp", "sharded/__1_0.distcp"} <= set(manifest["files"])
    resumed = _launch(tmp_path / "killed.yaml", 2, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    after = _metrics(run)
    assert [m["step"] for m in after] == list(range(1, 10))
    for ours, theirs in zip(after, reference):
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5, abs=1e-6)
    a = load_file(tmp_path / "full" / "run" / "final" / "model.safetensors")
    b = load_file(run / "final" / "model.safetensors")
    assert set(a) == set(b) and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)

    # The final folder against the last checkpoint's shards, consolidated without kdlm: same logits.
    final = AutoModelForCausalLM.from_pretrained(run / "final").eval()
    dcp_to_torch_save(run / "checkpoint-0000009" / "sharded", tmp_path / "step9.pt")
    shards = torch.load(tmp_path / "step9.pt", weights_only=True)["model"]
    independent = AutoModelForCausalLM.from_pretrained(run / "final").eval()
    missing, unexpected = independent.load_state_dict({k[len("lm."):]: v for k, v in shards.items()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    ids = torch.tensor([[5, 9, 14, 3, 7, 11]])
    with torch.no_grad():
        expected_logits = independent(ids).logits
        got_logits = final(ids).logits
    assert final.lm_head.weight is final.model.embed_tokens.weight  # still tied after the round trip
    assert torch.allclose(got_logits, expected_logits, atol=1e-5)
    # not vacuous: the step-3 shards give other logits
    dcp_to_torch_save(run / "checkpoint-0000003" / "sharded", tmp_path / "step3.pt")
    early = torch.load(tmp_path / "step3.pt", weights_only=True)["model"]
    independent.load_state_dict({k[len("lm."):]: v for k, v in early.items()}, strict=False)
    with torch.no_grad():
        assert not torch.allclose(independent(ids).logits, got_logits, atol=1e-3)


def test_fsdp_refuses_to_resume_on_another_process_count(tied, tmp_path):
    """A 2-process fsdp checkpoint resumed on 1 process is a clear error naming train.parallel; nothing rewritten."""
    cfg = tiny_config(tied, tmp_path, **{"train.max_steps": 2, "train.batch_size": 2, "train.save_every": 2,
                                         "train.parallel": "fsdp"})
    save_resolved(cfg, tmp_path / "run.yaml")
    assert _launch(tmp_path / "run.yaml", 2).returncode == 0
    def results() -> dict:
        run = tmp_path / "run"
        return {p: p.read_bytes() for p in [*run.glob("checkpoint-*/**/*"), *run.glob("final/*"), run / "metrics.jsonl"]
                if p.is_file()}

    before = results()
    result = subprocess.run([sys.executable, "-m", "kdlm", "distill", "--config", str(tmp_path / "run.yaml"),
                             "--resume"], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "written with train.parallel fsdp" in result.stderr and "Traceback" not in result.stderr
    assert results() == before


SMOKE = {
    # DDK re-weights domains every 2 steps from the (gathered) student's perplexities
    "ddk": {"data.mixing.strategy": "ddk", "data.mixing.interval": 2, "data.mixing.val_per_domain": 3},
    # with the before/after evaluation: it runs the bare models, gathered (sharding.full_parameters)
    "dpkd_token": {"objective.name": "dpkd", "objective.dpkd_form": "token", "eval.enabled": True,
                   "eval.num_samples": 1, "eval.max_new_tokens": 4},
    # greedy student samples: the same whichever process draws them
    "dpkd_sequence": {"objective.name": "dpkd", "objective.dpkd_form": "sequence",
                      "objective.sampling.max_new_tokens": 5, "objective.sampling.temperature": 0.0},
    "teacher_cache": {"cache.shard_size": 8},
}


@pytest.mark.parametrize("name", list(SMOKE))
def test_fsdp_other_objectives_and_options_equal_one_process(tied, tmp_path, name):
    """DDK mixing, dpkd in both forms and the teacher cache under fsdp: 2 × batch 2 gives the losses of 1 process ×
    batch 4 (rel 1e-5); with dpkd's token form also the held-out evaluation (KL, greedy samples)."""
    overrides = dict(SMOKE[name])
    if name == "teacher_cache":
        from kdlm.cache import build_cache

        overrides["cache.dir"] = str(tmp_path / "tcache")
        build_cache(tiny_config(tied, tmp_path / "build", **overrides))
    one = _run(tied, tmp_path / "one", 1, **overrides, **{"train.batch_size": 4})
    fsdp = _run(tied, tmp_path / "fsdp", 2, **overrides, **{"train.batch_size": 2, "train.parallel": "fsdp"})
    reference, got = _metrics(one), _metrics(fsdp)
    assert len(got) == len(reference) == 4
    assert "sharding" in json.loads((fsdp / "summary.json").read_text())  # it did run sharded
    for a, b in zip(reference, got):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
    if overrides.get("eval.enabled"):
        for tag in ("before", "after"):
            want = json.loads((one / f"eval_{tag}.json").read_text())
            have = json.loads((fsdp / f"eval_{tag}.json").read_text())
            assert have["overall"]["kl"] == pytest.approx(want["overall"]["kl"], rel=1e-5)
            assert have["samples"] == want["samples"]



def _lora():
    from kdlm.config import LoRAConfig

    return {"student.lora": LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), "train.lr": 1e-2}


@pytest.mark.parametrize("name", ["kd", "gkd"])
def test_fsdp_lora_student_equals_one_process_double_batch(tied, tmp_path, name):
    """A LoRA student under fsdp (frozen base weights and trainable adapters in the same FSDP2 units): 2 × batch 2
    gives the losses of 1 process × batch 4 (rel 1e-5), and the same final folder: the adapter (within 1e-5, the
    same adapter_config.json) and the merged model (within 1e-5), whose weights outside the adapted layers are the
    pruned student's, unchanged, with the tied embeddings still one tensor. gkd: greedy rollouts from the gathered
    LoRA student."""
    from transformers import AutoModelForCausalLM

    common = {**OBJECTIVES[name], **_lora(), "train.grad_accum": 2}
    one = _run(tied, tmp_path / "one", 1, **common, **{"train.batch_size": 4})
    fsdp = _run(tied, tmp_path / "fsdp", 2, **common, **{"train.batch_size": 2, "train.parallel": "fsdp"})
    report = json.loads((fsdp / "summary.json").read_text())["sharding"]  # it did run sharded, still tied
    assert report["student_tied"] and report["student_local_bytes"] < 0.6 * report["student_full_bytes"]
    reference, got = _metrics(one), _metrics(fsdp)
    assert len(got) == len(reference) == 4
    assert [m["response_tokens"] for m in got] == [m["response_tokens"] for m in reference]
    for a, b in zip(reference, got):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    for file in ("adapter/adapter_model.safetensors", "model.safetensors"):
        wa, wb = load_file(one / "final" / file), load_file(fsdp / "final" / file)
        assert set(wa) == set(wb) and wa, file
        for key in wa:
            assert torch.allclose(wa[key], wb[key], atol=1e-5), (file, key)
    adapter = load_file(fsdp / "final" / "adapter" / "adapter_model.safetensors")
    assert any("lora_B" in k for k in adapter) and all(float(v.abs().max()) > 0 for v in adapter.values())
    configs = [json.loads((run / "final" / "adapter" / "adapter_config.json").read_text()) for run in (one, fsdp)]
    for config in configs:  # peft writes a set (any order); the YAML round trip of torchrun's config gives 8.0
        config["target_modules"], config["lora_alpha"] = sorted(config["target_modules"]), float(config["lora_alpha"])
    assert configs[0] == configs[1]
    # The merged weights: the adapted layers moved, everything else is the pruned student's (layers 0 and 3).
    teacher = load_file(tied["teacher"] / "model.safetensors")
    merged = load_file(fsdp / "final" / "model.safetensors")
    for key, value in merged.items():
        source = key.replace("layers.1.", "layers.3.")
        if "q_proj" in key or "v_proj" in key:
            assert not torch.allclose(value, teacher[source], atol=1e-4), key
        else:
            assert torch.equal(value, teacher[source]), key
    model = AutoModelForCausalLM.from_pretrained(fsdp / "final")
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_fsdp_lora_kill_then_resume_is_exact_and_checkpoints_hold_the_adapters_only(tied, tmp_path, monkeypatch):
    """A LoRA student under fsdp, SIGKILL inside the accumulation window of step 5 (second epoch); --resume from
    the step-3 sharded checkpoint repeats the uninterrupted run's losses and final adapter. The sharded checkpoint
    holds the adapters and their AdamW state only (the frozen base is rebuilt from the config, as under ddp)."""
    from torch.distributed.checkpoint import FileSystemReader

    common = {**_lora(), "train.max_steps": 6, "train.grad_accum": 2, "train.batch_size": 2, "train.save_every": 3,
              "train.save_total_limit": 10, "train.parallel": "fsdp"}
    reference = _metrics(_run(tied, tmp_path / "full", 2, **common))
    cfg = tiny_config(tied, tmp_path / "killed", **{"train.log_every": 1, **common})
    save_resolved(cfg, tmp_path / "killed.yaml")
    monkeypatch.setenv("KDLM_FAULT_KILL_AFTER_MICROBATCHES", "9")  # the first half of step 5
    killed = _launch(tmp_path / "killed.yaml", 2)
    monkeypatch.delenv("KDLM_FAULT_KILL_AFTER_MICROBATCHES")
    run = tmp_path / "killed" / "run"
    assert killed.returncode != 0
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-0000003"]
    stored = FileSystemReader(str(run / "checkpoint-0000003" / "sharded")).read_metadata().state_dict_metadata
    weights = [key for key in stored if key.startswith("model.")]
    assert weights and all("lora_A" in key or "lora_B" in key for key in weights), weights
    assert len(weights) == 2 * 2 * 2  # 2 layers x (q_proj, v_proj) x (A, B)
    resumed = _launch(tmp_path / "killed.yaml", 2, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    after = _metrics(run)
    assert [m["step"] for m in after] == list(range(1, 7))
    for ours, theirs in zip(after, reference, strict=True):
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5, abs=1e-6)
    a = load_file(tmp_path / "full" / "run" / "final" / "adapter" / "adapter_model.safetensors")
    b = load_file(run / "final" / "adapter" / "adapter_model.safetensors")
    assert set(a) == set(b) and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.parametrize("tie", [True, False])
def test_fsdp_teacher_writes_the_one_process_responses(tied, tmp_path, tie):
    """Data without responses under fsdp: the teacher, loaded straight into its shards, is never whole in one process,
    so the processes generate the responses together, each its share of the batches, in lockstep (one process ends
    with a spare round). The responses cache equals the one a single process writes, byte for byte, and training on
    it gives the same losses. Tied and untied output layers (a tied one is the embedding, gathered for generate)."""
    from conftest import QA

    model = make_llama(len(tied["tokenizer"]) + PADDED_ROWS, layers=4, seed=4 if tie else 5, tie=tie)
    if tie:  # a tiny random tied model only repeats the prompt's last (special) token: empty responses
        torch.manual_seed(4)
        model.model.norm.weight.data = torch.randn(model.config.hidden_size)
    teacher = save_model(tmp_path / "teacher", model, tied["tokenizer"])
    prompts = [{"prompt": p + " " * (i % 3) + "Answer briefly." * (i % 4)} for i, (p, _) in enumerate(QA * 3)][:21]
    train = tmp_path / "prompts.jsonl"
    train.write_text("".join(json.dumps(row) + "\n" for row in prompts))
    evaluation = tmp_path / "eval_prompts.jsonl"
    evaluation.write_text("".join(json.dumps(row) + "\n" for row in prompts[:3]))
    overrides = {"teacher.name_or_path": str(teacher), "data.train": str(train), "data.eval": str(evaluation),
                 "data.generation.max_new_tokens": 6, "data.generation.batch_size": 3}
    assert -(-len(prompts) // 3) % 2 == 1  # an odd number of batches: process 1 runs a spare one
    one = _run(tied, tmp_path / "one", 1, **overrides, **{"train.batch_size": 4})
    fsdp = _run(tied, tmp_path / "fsdp", 2, **overrides, **{"train.batch_size": 2, "train.parallel": "fsdp"})
    assert json.loads((fsdp / "summary.json").read_text())["sharding"]["teacher_read_bytes"] is not None
    caches = [sorted((folder.parent / "cache" / "responses").glob("*.jsonl")) for folder in (one, fsdp)]
    assert [p.name for p in caches[0]] == [p.name for p in caches[1]] and len(caches[0]) == 2
    for a, b in zip(*caches):
        assert a.read_bytes() == b.read_bytes(), a.name
    train_cache = next(p for p in caches[0] if p.name.startswith("train-"))
    responses = [json.loads(line)["response"] for line in train_cache.read_text().splitlines()]
    assert len(responses) == len(prompts) and sum(map(bool, responses)) >= len(prompts) // 2
    assert len({len(r) for r in responses}) > 1  # rows stop at different steps: the lockstep is exercised
    for a, b in zip(_metrics(one), _metrics(fsdp), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
