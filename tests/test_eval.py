"""Teacher-forced evaluation and the `kdlm eval` command on tiny models."""

import json
import re
import shutil

import pytest
import torch
from conftest import make_llama, tiny_config

from kdlm import losses
from kdlm.cli import main
from kdlm.data import read_examples, tokenize_examples
from kdlm.eval.teacher_forced import teacher_forced_metrics
from kdlm.train.loop import distill


def test_teacher_forced_kl_is_token_weighted_mean(tiny):
    tokenizer = tiny["tokenizer"]
    vocab = len(tokenizer)
    student, teacher = make_llama(vocab, layers=1, seed=7).eval(), make_llama(vocab, layers=2, seed=8).eval()
    from kdlm.config import DataConfig

    examples, _ = read_examples(str(tiny["eval"]), DataConfig())
    items, _ = tokenize_examples(examples, tokenizer, max_prompt_length=64, max_length=128)
    result = teacher_forced_metrics(student, teacher, items, vocab_size=vocab, pad_id=tokenizer.pad_token_id, batch_size=3)
    # Oracle: one example at a time, full logits, every response token weighted once.
    kl_sum, ce_sum, count, overlap_sum, same_sum = 0.0, 0.0, 0, 0.0, 0
    for item in items:
        ids = torch.tensor([item.input_ids])
        with torch.no_grad():
            s, t = student(ids).logits[0, :-1], teacher(ids).logits[0, :-1]
        targets = torch.tensor(item.labels[1:])
        keep = targets != -100
        kl_sum += float(losses.fkl(s[keep], t[keep]).sum())
        ce_sum += float(torch.nn.functional.cross_entropy(s[keep], targets[keep], reduction="sum"))
        count += int(keep.sum())
        for s_row, t_row in zip(s[keep], t[keep]):
            s_top, t_top = s_row.topk(5).indices.tolist(), t_row.topk(5).indices.tolist()
            overlap_sum += len(set(s_top) & set(t_top)) / 5
            same_sum += s_top == t_top
    assert result["overall"]["tokens"] == count
    assert result["overall"]["kl"] == pytest.approx(kl_sum / count, rel=1e-4)
    assert result["overall"]["student_ce"] == pytest.approx(ce_sum / count, rel=1e-4)
    assert result["overall"]["mor@5"] == pytest.approx(overlap_sum / count, abs=1e-6)
    assert result["overall"]["cr@5"] == pytest.approx(same_sum / count, abs=1e-6)
    assert set(result) == {"overall", "domain/alpha", "domain/beta"}


def test_eval_command(tiny, tmp_path, capsys):
    cfg = tiny_config(tiny, tmp_path, **{"train.max_steps": 2})
    distill(cfg)
    capsys.readouterr()
    code = main(["eval", "--teacher.name_or_path", str(tiny["teacher"]), "--data.train", str(tiny["train"]),
                 "--data.eval", str(tiny["eval"]), "--student.num_layers", "2", "--eval.num_samples", "2",
                 "--eval.max_new_tokens", "4", "--eval.gen_max_new_tokens", "6",
                 "--model", str(tmp_path / "run" / "final")])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["overall"]["kl"] > 0 and set(printed["generation"]) >= {"rouge_l", "exact_match", "self_bleu"}
    saved = json.loads((tmp_path / "run" / "eval_final.json").read_text())
    assert len(saved["samples"]) == 2
    # The text metrics agree with rouge-score run here on the saved predictions (an independent computation).
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rows = [json.loads(x) for x in (tmp_path / "run" / "predictions_final.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["seed"] is None for r in rows)
    expected = sum(100 * scorer.score(r["reference"], r["prediction"])["rougeL"].fmeasure for r in rows) / len(rows)
    assert saved["generation"]["mean"]["overall"]["rouge_l"] == pytest.approx(expected, abs=1e-9)
    alpha = [r for r in rows if r["domain"] == "alpha"]
    expected_alpha = sum(100 * scorer.score(r["reference"], r["prediction"])["rougeL"].fmeasure for r in alpha) / len(alpha)
    assert saved["generation"]["mean"]["domains"]["alpha"]["rouge_l"] == pytest.approx(expected_alpha, abs=1e-9)


def test_eval_sampling_protocol_reports_mean_and_std_over_seeds(tiny, tmp_path, capsys):
    cfg = tiny_config(tiny, tmp_path, **{"train.max_steps": 1})
    distill(cfg)
    args = ["eval", "--teacher.name_or_path", str(tiny["teacher"]), "--data.train", str(tiny["train"]),
            "--data.eval", str(tiny["eval"]), "--student.num_layers", "2", "--eval.num_samples", "0",
            "--eval.decoding", "sample", "--eval.seeds", "[1, 2, 1]", "--eval.gen_max_new_tokens", "8",
            "--model", str(tmp_path / "run" / "final")]
    assert main(args) == 0
    saved = json.loads((tmp_path / "run" / "eval_final.json").read_text())["generation"]
    runs = [run["overall"]["distinct_1"] for run in saved["per_seed"]]
    assert len(runs) == 3 and runs[0] == runs[2]  # same seed, same samples
    rows = [json.loads(x) for x in (tmp_path / "run" / "predictions_final.jsonl").read_text().splitlines()]
    by_seed = {seed: [r["prediction"] for r in rows if r["seed"] == seed] for seed in (1, 2)}
    assert len(rows) == 12 and by_seed[1][:4] == by_seed[1][4:] and by_seed[1][:4] != by_seed[2]
    import statistics

    assert saved["mean"]["overall"]["distinct_1"] == pytest.approx(statistics.mean(runs))
    assert saved["std"]["overall"]["distinct_1"] == pytest.approx(statistics.stdev(runs))


def test_eval_command_without_model_is_a_clear_error(tiny, tmp_path, capsys):
    code = main(["eval", "--teacher.name_or_path", str(tiny["teacher"]), "--model", str(tmp_path / "nothing")])
    assert code == 1 and "no model here" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------------
# issue 15: re-exports, the before/after table's changes and labels
# --------------------------------------------------------------------------------------------------------------
def test_losses_reexport_dpkd():
    from kdlm.losses import dpkd

    assert losses.dpkd_token_loss is dpkd.dpkd_token_loss and losses.dpkd_sequence_loss is dpkd.dpkd_sequence_loss
    assert {"dpkd_token_loss", "dpkd_sequence_loss"} <= set(losses.__all__)


@pytest.mark.parametrize(
    "before, after, expected",
    [
        (2.0, 1.5, "-25.0%"),  # (1.5 - 2) / 2
        (0.5, 0.55, "+10.0%"),
        (float("nan"), 1.0, "—"),
        (1.0, float("inf"), "—"),
        (0.0, 0.25, "+0.25 (abs.)"),  # no relative change from zero
        (0.001, 0.0579, "+0.0569 (abs.)"),  # a rate 0.001 -> 0.0579 is not "+5690%"
        (4.0, 4.0, "+0.0%"),
    ],
)
def test_format_change(before, after, expected):
    from kdlm.report import format_change

    assert format_change(before, after) == expected


def test_comparison_table_never_prints_nan_percent_and_labels_references_by_source():
    from kdlm.eval.heldout import format_comparison

    before = {"overall": {"kl": 14.0, "teacher_ce": float("nan"), "cr@5": 0.001},
              "samples": [{"prompt": "p", "reference": "given", "reference_source": "dataset", "student": "x"},
                          {"prompt": "q", "reference": "written", "reference_source": "teacher", "student": "y"}]}
    after = {"overall": {"kl": 7.0, "teacher_ce": float("nan"), "cr@5": 0.0579},
             "samples": [{"prompt": "p", "student": "x2"}, {"prompt": "q", "student": "y2"}]}
    text = format_comparison(before, after)
    assert "nan%" not in text and "5690" not in text
    assert "| -50.0% |" in text and "| — |" in text and "+0.0569 (abs.)" in text
    assert re.search(r"\nreference: +given\n", text) and re.search(r"\nteacher: +written\n", text)
    assert not re.search(r"teacher: +given", text)


def test_log_lines_are_printed_once_after_rouge_score_is_used(tiny, tmp_path, capfd, monkeypatch):
    import logging

    # As in a real `kdlm eval` process: the first use of rouge-score's scoring puts a stderr handler on the root
    # logger (a module-level logging call configures it when it has none; seen once per process, so it is
    # reproduced here directly, with pytest's own root handlers set aside for this test).
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    logging.basicConfig()
    distill(tiny_config(tiny, tmp_path, **{"train.max_steps": 1}))
    capfd.readouterr()
    code = main(["eval", "--teacher.name_or_path", str(tiny["teacher"]), "--data.train", str(tiny["train"]),
                 "--data.eval", str(tiny["eval"]), "--student.num_layers", "2", "--eval.num_samples", "0",
                 "--eval.gen_max_new_tokens", "4", "--model", str(tmp_path / "run" / "final")])
    assert code == 0
    err = capfd.readouterr().err
    assert err.count("eval data:") == 1, err
    assert err.count("eval generation: ROUGE-L") == 1, err


# --------------------------------------------------------------------------------------------------------------
# issue 15: kdlm eval on the accelerator, one teacher load for repeated calls, no output inside the kdlm cache
# --------------------------------------------------------------------------------------------------------------
def _eval_cfg(tiny, tmp_path):
    from kdlm.cli import parse_config

    cfg, _ = parse_config(["--teacher.name_or_path", str(tiny["teacher"]), "--data.train", str(tiny["train"]),
                           "--data.eval", str(tiny["eval"]), "--student.num_layers", "2", "--eval.num_samples", "0",
                           "--eval.gen_max_new_tokens", "3", "--data.cache_dir", str(tmp_path / "cache"),
                           "--train.output_dir", str(tmp_path / "out")], "eval")
    return cfg


def test_eval_moves_models_to_the_accelerator_and_loads_the_teacher_once(tiny, tmp_path, monkeypatch):
    import kdlm.models
    from kdlm.eval import run

    loads, moves = [], []
    real_load, real_to = kdlm.models.load_model, torch.nn.Module.to

    def counting_load(name_or_path, **kwargs):
        loads.append(name_or_path)
        return real_load(name_or_path, **kwargs)

    def recording_to(self, *args, **kwargs):
        moves.append((id(self), args[0] if args else kwargs.get("device")))
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(run, "_kept_teacher", {})  # a teacher kept by an earlier test's call
    monkeypatch.setattr(kdlm.models, "load_model", counting_load)
    monkeypatch.setattr(torch.nn.Module, "to", recording_to)
    device = run.eval_device()
    assert device.type == ("cuda" if torch.cuda.is_available() else device.type)
    seen = []
    real_metrics = run.evaluate_and_report

    def spy(student, **kwargs):
        seen.append((student, kwargs["teacher"]))
        return real_metrics(student, **kwargs)

    monkeypatch.setattr(run, "evaluate_and_report", spy)
    for _ in range(2):
        run.evaluate_command(_eval_cfg(tiny, tmp_path), model_path=str(tiny["student"]))
    assert loads.count(str(tiny["teacher"])) == 1 and loads.count(str(tiny["student"])) == 2
    (s1, t1), (s2, t2) = seen
    assert t1 is t2 and s1 is not s2  # the teacher is kept, each student loaded afresh
    for model in (s1, t1, s2):
        assert (id(model), device) in moves
        assert next(model.parameters()).device.type == device.type


def test_eval_of_a_model_inside_the_kdlm_cache_writes_to_the_run_dir(tiny, tmp_path):
    from kdlm.eval import run

    cached = shutil.copytree(tiny["student"], tmp_path / "cache" / "gguf" / "teacher-abc")
    before = sorted(p.name for p in cached.parent.rglob("*"))
    run.evaluate_command(_eval_cfg(tiny, tmp_path), model_path=str(cached))
    assert sorted(p.name for p in cached.parent.rglob("*")) == before
    assert (tmp_path / "out" / "eval_teacher-abc.json").is_file()
    assert (tmp_path / "out" / "predictions_teacher-abc.jsonl").is_file()
