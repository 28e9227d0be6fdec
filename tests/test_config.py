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


# --------------------------------------------------------------------------------------------------------------
# issue 15: paths that do not exist are named by `kdlm validate`, and by `kdlm distill` before anything is loaded
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "flags, key",
    [
        (["--data.train", "{missing}.jsonl"], "data.train"),
        (["--data.eval", "{missing}.parquet"], "data.eval"),
        (["--data.mixing.strategy", "equal", "--data.mixing.validation", "{missing}.jsonl"], "data.mixing.validation"),
        (["--objective.name", "dpkd", "--objective.lm_data", "{missing}.jsonl"], "objective.lm_data"),
        (["--teacher.name_or_path", "{missing}"], "teacher.name_or_path"),
        (["--student.init", "pretrained", "--student.name_or_path", "{missing}"], "student.name_or_path"),
        (["--cache.dir", "{missing}"], "cache.dir"),
    ],
)
def test_validate_names_a_path_that_does_not_exist(flags, key, tmp_path, capsys):
    missing = str(tmp_path / "not_here")
    argv = ["validate"] + [f.format(missing=missing) for f in flags]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert key in err and missing in err and "does not exist" in err
    assert "config is valid" not in err


def test_teacher_gguf_file_must_exist_in_its_local_folder(tmp_path, capsys):
    assert main(["validate", "--teacher.name_or_path", str(tmp_path), "--teacher.gguf_file", "m.gguf"]) == 2
    assert "teacher.gguf_file" in capsys.readouterr().err


def test_hub_names_and_existing_paths_pass_the_path_check(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n')
    argv = ["validate", "--teacher.name_or_path", "HuggingFaceTB/SmolLM2-135M-Instruct", "--data.train", str(data),
            "--data.eval", "tatsu-lab/alpaca"]
    assert main(argv) == 0
    assert "config is valid" in capsys.readouterr().err
    # cache-teacher writes cache.dir, so it need not exist yet
    cfg, _ = parse_config(["--cache.dir", str(tmp_path / "new_cache")], "cache-teacher")
    assert cfg.cache.dir.endswith("new_cache")


def test_distill_checks_paths_before_loading_models_or_creating_the_run_dir(tmp_path, monkeypatch):
    import kdlm.models
    from kdlm.config import validate
    from kdlm.train import loop

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the paths were checked")

    monkeypatch.setattr(loop, "load_models", no_loading)
    monkeypatch.setattr(kdlm.models, "load_models", no_loading)
    cfg = Config()
    cfg.data.train = str(tmp_path / "missing.jsonl")
    cfg.train.output_dir = str(tmp_path / "run")
    with pytest.raises(ConfigError, match=r"data\.train: .*missing\.jsonl does not exist"):
        loop.distill(validate(cfg))
    assert not (tmp_path / "run").exists()
