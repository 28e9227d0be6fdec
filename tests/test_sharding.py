"""train.parallel fsdp: the config checks (fast tier). The 2-process runs are in test_sharding_slow.py."""

from __future__ import annotations

import pytest
from conftest import tiny_config

from kdlm.config import ConfigError, LoRAConfig


def test_fsdp_refuses_a_lora_student(tiny, tmp_path):
    """LoRA under fsdp is a ConfigError naming train.parallel, raised before any model is loaded."""
    with pytest.raises(ConfigError, match="student.lora is not supported with train.parallel fsdp"):
        tiny_config(tiny, tmp_path, **{"train.parallel": "fsdp", "student.lora": LoRAConfig(r=4)})


def test_fsdp_options_need_fsdp(tiny, tmp_path):
    with pytest.raises(ConfigError, match="only apply to train.parallel fsdp"):
        tiny_config(tiny, tmp_path, **{"train.fsdp_cpu_offload": True})
    cfg = tiny_config(tiny, tmp_path, **{"train.parallel": "fsdp", "train.fsdp_param_dtype": "bfloat16"})
    assert cfg.train.parallel == "fsdp"
