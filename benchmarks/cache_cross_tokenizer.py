"""How exact ULD is from a cross-tokenizer teacher cache (top-k + tail mass) on the demo teacher.

Exact command (from the repository root, after `make install`):

    PYTHONPATH=src .venv/bin/python benchmarks/cache_cross_tokenizer.py

Setup: the demo teacher (SmolLM2-135M-Instruct, V_T = 49,152, float32) and, as the student distribution, the
demo's 9-layer pruned student (ULD compares sorted probability vectors only, so any student distribution
serves; this one is a realistic untrained-student shape). Positions: every response token of the first
``--examples`` (8) held-out prompts with the teacher's cached responses, τ = objective.temperature (1).
For each k: the teacher's tail mass r = 1 − Σ top-k, ULD from the stored signal (:func:`uld_topk`: the top-k
exact, the ranks after k one bucket each side) against the live ULD (:func:`uld_distance`), the bound 2r, and the
alternative kdlm does not use: r spread evenly over the other V_T − k ranks (each r/(V_T − k)), then sorted.
The signal is taken in float32 (``cache.dtype: float32``), so only the top-k truncation is measured.
Writes ``benchmarks/results/cache_cross_tokenizer_cpu.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from kdlm.config import Config
from kdlm.data import collate, load_splits, tokenize_examples
from kdlm.data.format import response_positions
from kdlm.generation import fill_teacher_responses
from kdlm.losses import sparse
from kdlm.losses.cross_tokenizer import sorted_l1, uld_distance, uld_topk
from kdlm.models import DecoderOnly, OutputHead, load_models

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=8)
    parser.add_argument("--ks", type=int, nargs="+", default=[8, 32, 128, 1024])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cache_cross_tokenizer_cpu"))
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    cfg = Config()  # the demo
    models = load_models(cfg)
    teacher, student, tokenizer, vocab = models.teacher.eval(), models.student.eval(), models.tokenizer, models.vocab_size
    _, eval_examples, _ = load_splits(cfg.data, cfg.train.seed)
    fill_teacher_responses(cfg, teacher, tokenizer, eval_examples, "eval")
    items, _ = tokenize_examples(eval_examples[:args.examples], tokenizer, max_prompt_length=cfg.data.max_prompt_length,
                                 max_length=cfg.data.max_length, system_prompt=cfg.data.system_prompt)
    tau = cfg.objective.temperature
    t_logp, s_logits = [], []
    for start in range(0, len(items), 8):
        batch = collate(items[start:start + 8], tokenizer.pad_token_id)
        mask, _ = response_positions(batch)
        for model, out in ((teacher, t_logp), (student, s_logits)):
            hidden = DecoderOnly(model)(batch["input_ids"], batch["attention_mask"])[:, :-1][mask]
            logits = OutputHead.of(model, vocab).logits(hidden).float()
            out.append(torch.log_softmax(logits / tau, -1) if model is teacher else logits)
    t_logp, s_logits = torch.cat(t_logp), torch.cat(s_logits)
    live = uld_distance(s_logits, t_logp, temperature=tau)  # log-probs are logits of the same distribution
    rows = []
    for k in args.ks:
        ids, values, tail = sparse.topk_signal(t_logp, k)
        cached = uld_topk(s_logits, sparse.pack_payload(ids, values, tail), temperature=tau)
        error, r = (cached - live).abs(), tail.exp()
        spread = (r / (vocab - k)).unsqueeze(-1).expand(-1, vocab - k)
        uniform = sorted_l1(torch.cat([values.exp(), spread], -1), torch.softmax(s_logits / tau, -1))
        uniform_error = (uniform - live).abs()
        rows.append({"k": k, "tail_mass_mean": float(r.mean()), "tail_mass_p95": float(r.quantile(0.95)),
                     "uld_live_mean": float(live.mean()), "abs_error_mean": float(error.mean()),
                     "abs_error_max": float(error.max()), "relative_error_of_mean": float(error.mean() / live.mean()),
                     "bound_2r_mean": float(2 * r.mean()), "bound_holds": bool((error <= 2 * r + 1e-6).all()),
                     "uniform_spread_abs_error_mean": float(uniform_error.mean())})
        print(json.dumps(rows[-1]), flush=True)
    result = {"positions": int(t_logp.shape[0]), "examples": len(items), "teacher_vocab": vocab, "rows": rows}
    Path(args.out + ".json").write_text(json.dumps(result, indent=1))
    lines = [f"ULD from a top-k teacher cache vs the live teacher: demo teacher (V_T = {vocab}), pruned student as the "
             f"student distribution, {result['positions']} response positions of {len(items)} held-out examples, "
             "float32 signal (`benchmarks/cache_cross_tokenizer.py`).", "",
             "| k | tail mass r (mean / p95) | live ULD (mean) | abs. error mean / max | error / ULD | bound 2r (mean), holds | "
             "alternative: r spread evenly, abs. error mean |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['k']} | {row['tail_mass_mean']:.4f} / {row['tail_mass_p95']:.4f} | {row['uld_live_mean']:.4f} | "
                     f"{row['abs_error_mean']:.5f} / {row['abs_error_max']:.4f} | {100 * row['relative_error_of_mean']:.2f} % | "
                     f"{row['bound_2r_mean']:.4f}, {'yes' if row['bound_holds'] else 'NO'} | "
                     f"{row['uniform_spread_abs_error_mean']:.5f} |")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
