"""Config: strict keys and types, contradictions named, YAML + dotted overrides, resolved config round-trip."""

import subprocess
import sys

import pytest
import yaml

from kdlm.cli import main, parse_config
from kdlm.config import Config, ConfigError, save_resolved


def test_defaults_are_the_demo():
    cfg, _ = parse_config([])
    assert cfg.teacher.name_or_path == "builtin:smollm2-135m-instruct"
    assert cfg.student.init == "prune_teacher" and cfg.objective.name == "kd" and cfg.objective.divergence == "fkl"


def test_yaml_then_dotted_overrides_win(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"train": {"lr": 0.5, "batch_size": 3}, "objective": {"divergence": "jsd", "beta": 0.2}}))
    cfg, _ = parse_config(["--config", str(path), "--train.lr", "1e-4"])
    assert cfg.train.lr == 1e-4  # flag after the file overrides it
    assert cfg.train.batch_size == 3  # from the file
    assert cfg.objective.divergence == "jsd" and cfg.objective.beta == 0.2


@pytest.mark.parametrize(
    "argv, key",
    [
        (["--train.lrr", "1"], "lrr"),
        (["--train.batch_size", "many"], "train.batch_size"),
        (["--objective.divergence", "kl"], "objective.divergence"),
        (["--teacher.dtype", "float64"], "teacher.dtype"),
    ],
)
def test_bad_keys_and_types_name_the_key(argv, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        parse_config(argv)


def test_unknown_key_in_yaml_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        parse_config(["--config", str(path)])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--objective.beta", "0.3"], "objective.beta applies to divergence jsd"),
        (["--objective.divergence", "akl", "--objective.alpha", "0.2"], "objective.alpha"),
        (["--student.init", "pretrained"], "student.name_or_path is required"),
        (["--student.init", "pretrained", "--student.name_or_path", "x", "--student.keep_layers", "[0, 1]"], "student.keep_layers"),
        (["--student.name_or_path", "x"], "student.name_or_path only applies"),
        (["--objective.kd_ratio", "1.5"], "objective.kd_ratio"),
        (["--data.max_length", "10", "--data.max_prompt_length", "20"], "data.max_length"),
        (["--data.responses", "dataset"], "data.responses=dataset"),
    ],
)
def test_contradictions_are_errors(argv, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        parse_config(argv)


def test_resolved_config_round_trips(tmp_path):
    cfg, _ = parse_config(["--objective.divergence", "jsd", "--objective.beta", "0.9", "--student.keep_layers", "[0, 5, 9]"])
    save_resolved(cfg, tmp_path / "config.yaml")
    again, _ = parse_config(["--config", str(tmp_path / "config.yaml")])
    assert again == cfg
    assert again != Config()


def test_resume_flag_sets_train_resume():
    cfg, _ = parse_config(["--resume"], "distill")
    assert cfg.train.resume is True


def test_validate_command_prints_and_exits(capsys):
    assert main(["validate", "--train.lr", "0.001"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["lr"] == 0.001 and printed["objective"]["kd_ratio"] == 0.5
    assert main(["validate", "--objective.mu", "0.3"]) == 2
    assert "objective.mu" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    result = subprocess.run([sys.executable, "-m", "kdlm", "validate", "--train.nope", "1"], capture_output=True, text=True)
    assert result.returncode == 2 and "nope" in result.stderr
