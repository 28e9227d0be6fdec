"""train.parallel fsdp: the config checks (fast tier). The 2-process runs are in test_sharding_slow.py."""

from __future__ import annotations

import pytest
from conftest import tiny_config

from kdlm.config import ConfigError, LoRAConfig


def test_fsdp_accepts_a_lora_student(tiny, tmp_path):
    """LoRA under fsdp is a valid config (the 2-process runs are in test_sharding_slow.py), with the fsdp options."""
    cfg = tiny_config(tiny, tmp_path, **{"train.parallel": "fsdp", "train.fsdp_reshard_after_forward": False,
                                         "student.lora": LoRAConfig(r=4)})
    assert cfg.train.parallel == "fsdp" and cfg.student.lora.r == 4


def test_fsdp_options_need_fsdp(tiny, tmp_path):
    with pytest.raises(ConfigError, match="only apply to train.parallel fsdp"):
        tiny_config(tiny, tmp_path, **{"train.fsdp_cpu_offload": True})
    with pytest.raises(ConfigError, match="train.fsdp_reshard_after_forward only apply to train.parallel fsdp"):
        tiny_config(tiny, tmp_path, **{"train.fsdp_reshard_after_forward": False})
    cfg = tiny_config(tiny, tmp_path, **{"train.parallel": "fsdp", "train.fsdp_param_dtype": "bfloat16"})
    assert cfg.train.parallel == "fsdp"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the refusal is for CPU-only machines")
def test_fsdp_cpu_offload_without_a_gpu_is_a_config_error():
    """FSDP2's CPUOffloadPolicy needs an accelerator (measured: it fails on CPU with "Cannot access accelerator
    device when none is available"): kdlm says so, naming the field, instead of that error."""
    from kdlm.config import TrainConfig
    from kdlm.train.sharding import _policies

    with pytest.raises(ConfigError, match="train.fsdp_cpu_offload needs a GPU"):
        _policies(TrainConfig(parallel="fsdp", fsdp_cpu_offload=True))
    assert "offload_policy" not in _policies(TrainConfig(parallel="fsdp"))


@pytest.fixture
def one_process_group(tmp_path):
    """A 1-process gloo group in this process (FSDP2 needs one), always destroyed after the test."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_sharded_tied_head_gets_the_fused_loss_gradient(one_process_group):
    """FSDP2 student (layers + DecoderOnly root), tied embeddings, padded vocabulary: the fused loss reads the output
    layer after the forward, and the gradient it produces reaches the sharded parameter: the tied embedding's gradient
    equals the unsharded model's (which gets both the embedding's and the head's part). Reading the head while the
    root is sharded, for a trainable weight, is refused."""
    import copy

    import torch
    from conftest import make_llama

    from kdlm import losses
    from kdlm.config import TrainConfig
    from kdlm.models import DecoderOnly, OutputHead
    from kdlm.train.sharding import full_parameters, shard_student

    vocab = 40
    plain = make_llama(vocab + 6, layers=2, seed=4, tie=True)
    sharded = DecoderOnly(copy.deepcopy(plain))
    shard_student(sharded, TrainConfig(parallel="fsdp"), torch.device("cpu"))
    lm = sharded.lm
    assert lm.lm_head.weight is lm.model.embed_tokens.weight  # still one parameter
    with pytest.raises(RuntimeError, match="read outside its forward"):
        OutputHead.of(lm, vocab)
    ids = torch.tensor([[3, 7, 9, 12, 5, 30], [2, 8, 8, 1, 39, 4]])
    attention = torch.ones_like(ids)
    teacher_logits_weight = torch.randn(vocab, 32)
    teacher_hidden = torch.randn(12, 32)
    mask = torch.ones(12, dtype=torch.bool)
    labels = ids.roll(-1, dims=1).reshape(-1)

    def loss(model: DecoderOnly) -> torch.Tensor:
        hidden = model(ids, attention).reshape(12, -1)
        head = OutputHead.of(model.lm, vocab)  # after the forward: gathered by the root unit
        terms = losses.fused_kd_terms(hidden, head.weight, teacher_hidden, teacher_logits_weight, mask,
                                      labels=labels, kd_ratio=0.5, chunk_size=5)
        return terms.loss_sum

    reference = DecoderOnly(plain)
    loss(reference).backward()
    loss(sharded).backward()
    grad = lm.model.embed_tokens.weight.grad
    grad = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
    assert torch.allclose(grad, plain.model.embed_tokens.weight.grad, atol=1e-6)
    with full_parameters(lm):  # gathered as plain tensors: the bare model runs (sampling, evaluation)
        assert not hasattr(lm.lm_head.weight, "full_tensor")
        with torch.no_grad():
            assert torch.allclose(lm(ids).logits, plain(ids).logits, atol=1e-6)
    assert hasattr(lm.lm_head.weight, "full_tensor")  # sharded again after


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="glibc's malloc_trim: Linux only")
def test_release_freed_memory_returns_the_freed_heap_to_the_system():
    """What the full models leave behind after sharding: tensors freed into glibc's heap below a live one stay
    resident (glibc only trims the heap's top by itself); release_freed_memory hands them back. 256 MB in 64 KB
    tensors (heap-allocated, under glibc's mmap threshold), pinned by a tensor allocated after them, then freed.
    Run in a fresh process: in the full suite the heap's state depends on every earlier test in this one."""
    import os
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    script = textwrap.dedent(f"""
        import torch
        from kdlm.train.sharding import release_freed_memory

        def anon_rss_mb():
            for line in open("/proc/self/status"):
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024

        blocks = [torch.ones(16384) for _ in range(4096)]  # 4096 x 64 KB, written, so resident
        pin = torch.ones(16)  # allocated above them: the freed blocks are not the heap's top
        del blocks
        freed = anon_rss_mb()
        assert release_freed_memory() is True
        print(freed - anon_rss_mb())
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")})
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(result.stdout.split()[-1]) > 128, result.stdout  # without the trim they stay resident


@pytest.mark.parametrize("tie", [True, False])
def test_teacher_loaded_straight_into_shards_equals_the_loaded_teacher(one_process_group, tmp_path, tie):
    """load_teacher_into_shards (meta device, shards read from the safetensors files) gives the logits of the teacher
    from_pretrained loads, keeps a tied pair one parameter, keeps the rotary buffers (to_empty would have emptied
    them), and a student pruned from the files equals the one pruned from the loaded teacher. (One process holds all
    rows; the 2-process runs in test_sharding_slow.py check the rows each process reads.)"""
    import torch
    from conftest import make_llama, make_tokenizer, save_model, tiny_config

    from kdlm.models import DecoderOnly, OutputHead, load_model, prune_from_teacher
    from kdlm.train.sharding import full_parameters, load_teacher_into_shards, memory_report

    tokenizer = make_tokenizer()
    folder = save_model(tmp_path / "teacher", make_llama(len(tokenizer) + 6, layers=3, seed=7, tie=tie), tokenizer)
    cfg = tiny_config({"teacher": folder, "train": folder, "eval": folder}, tmp_path, **{"train.parallel": "fsdp"})
    plain = load_model(str(folder)).eval()
    sharded, weights = load_teacher_into_shards(cfg, torch.device("cpu"))
    assert (sharded.lm_head.weight is sharded.model.embed_tokens.weight) == tie
    ids = torch.tensor([[3, 7, 9, 12, 5, 30], [2, 8, 8, 1, 20, 4]])
    attention = torch.ones_like(ids)
    with torch.no_grad():
        want = OutputHead.of(plain, len(tokenizer)).logits(DecoderOnly(plain)(ids, attention))
        got = OutputHead.of(sharded, len(tokenizer)).logits(DecoderOnly(sharded)(ids, attention))
    assert torch.allclose(got, want, atol=1e-6)
    for name, buffer in plain.named_buffers():
        assert torch.equal(dict(sharded.named_buffers())[name], buffer), name
    report = memory_report(DecoderOnly(make_llama(len(tokenizer), layers=1)), sharded)
    assert report["teacher_read_bytes"] == report["teacher_full_bytes"]  # one process: every row is its own
    before = weights.bytes_read
    with full_parameters(sharded):
        from_files = prune_from_teacher(sharded, [0, 2], weights=weights)
    from_module = prune_from_teacher(plain, [0, 2])
    assert from_files.state_dict().keys() == from_module.state_dict().keys()
    assert (from_files.lm_head.weight is from_files.model.embed_tokens.weight) == tie
    for name, buffer in from_module.named_buffers():
        assert torch.equal(dict(from_files.named_buffers())[name], buffer), name
    for key, value in from_module.state_dict().items():
        assert torch.equal(from_files.state_dict()[key], value), key
    layer = sum(v.numel() * 4 for k, v in plain.state_dict().items() if ".layers.1." in k)
    assert weights.bytes_read - before == report["teacher_full_bytes"] - layer  # the dropped layer is never read


def test_sharded_tied_teacher_gathers_its_embedding_once_per_microbatch(one_process_group, tmp_path, monkeypatch):
    """A tied teacher under fsdp: after its forward the root stays gathered and the loss's output layer is that
    gathered embedding (same storage, no DTensor.full_tensor: the second all-gather per micro-batch is gone);
    release_teachers shards it again and points the head back at the sharded parameter, and the next forward
    gathers again and gives the same logits as the unsharded teacher."""
    import copy

    import torch
    from conftest import make_llama
    from torch.distributed.tensor import DTensor

    from kdlm.config import TrainConfig
    from kdlm.models import DecoderOnly, OutputHead
    from kdlm.train.sharding import release_teachers, shard_teacher

    plain = make_llama(46, layers=2, seed=4, tie=True).eval().requires_grad_(False)
    teacher = shard_teacher(copy.deepcopy(plain), TrainConfig(parallel="fsdp"), torch.device("cpu"))
    assert isinstance(teacher.lm_head.weight, DTensor)  # sharded between micro-batches
    gathers = []
    monkeypatch.setattr(DTensor, "full_tensor", lambda self, *a, **k: gathers.append(1) or self.to_local())
    ids = torch.tensor([[3, 7, 9, 12], [2, 8, 8, 1]])
    with torch.no_grad():
        want = OutputHead.of(plain, 40).logits(DecoderOnly(plain)(ids, torch.ones_like(ids)))
        for _ in range(2):
            hidden = DecoderOnly(teacher)(ids, torch.ones_like(ids))
            head = OutputHead.of(teacher, 40)
            assert not isinstance(teacher.model.embed_tokens.weight, DTensor)
            assert head.weight.data_ptr() == teacher.model.embed_tokens.weight.data_ptr()
            assert torch.allclose(head.logits(hidden), want, atol=1e-6)
            release_teachers()
            assert isinstance(teacher.lm_head.weight, DTensor) and teacher.lm_head.weight is teacher.model.embed_tokens.weight
    assert gathers == []
