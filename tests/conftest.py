"""Tiny models and a tiny tokenizer built inside the tests: no downloads, seconds per test."""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<eos>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]


def make_tokenizer(extra_chars: str = "", chat_template: bool = True):
    """A character-level fast tokenizer: every printable ASCII character is one token."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable) - set("\x0b\x0c") | set(extra_chars))
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
    )
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_llama(vocab_size: int, layers: int = 4, seed: int = 0, hidden: int = 32, tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=tie,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    return LlamaForCausalLM(config)


def save_model(folder: Path, model, tokenizer) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "divergences.safetensors"


def load_fixture_cases() -> tuple[dict[str, torch.Tensor], dict]:
    """The golden fixture tensors and metadata; fails (never skips) when shared/fixtures is missing."""
    if not FIXTURES.is_file():
        pytest.fail(f"reference fixtures not found at {FIXTURES}: shared/ must sit beside the checkout")
    from safetensors import safe_open

    with safe_open(str(FIXTURES), "pt") as handle:
        meta = json.loads(handle.metadata()["kdlm_fixture"])
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    return tensors, meta


QA = [
    ("What colour is the sky?", "The sky is blue."),
    ("Name a fruit.", "An apple is a fruit."),
    ("What is two plus two?", "Two plus two is four."),
    ("Say hello.", "Hello there!"),
    ("What do cows drink?", "Cows drink water."),
    ("Name a planet.", "Mars is a planet."),
    ("What is ice?", "Ice is frozen water."),
    ("Count to three.", "One, two, three."),
]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A teacher folder (4 layers), a same-tokenizer student folder (2 layers), and train/eval JSONL files."""
    root = tmp_path_factory.mktemp("tiny")
    tokenizer = make_tokenizer()
    vocab = len(tokenizer)
    teacher_dir = save_model(root / "teacher", make_llama(vocab, layers=4, seed=1), tokenizer)
    student_dir = save_model(root / "student", make_llama(vocab, layers=2, seed=2), tokenizer)
    domains = ["alpha", "beta"]
    train = [{"prompt": p, "response": r, "domain": domains[i % 2]} for i, (p, r) in enumerate(QA * 4)]
    evaluation = [{"prompt": p, "response": r, "domain": domains[i % 2]} for i, (p, r) in enumerate(QA[:4])]
    return {
        "root": root,
        "tokenizer": tokenizer,
        "teacher": teacher_dir,
        "student": student_dir,
        "train": write_jsonl(root / "train.jsonl", train),
        "eval": write_jsonl(root / "eval.jsonl", evaluation),
    }


def tiny_config(tiny, tmp_path: Path, **overrides):
    """A Config for the tiny setup; ``overrides`` are dotted keys, e.g. ``{"train.max_steps": 5}``."""
    from kdlm.config import Config, validate

    cfg = Config()
    cfg.teacher.name_or_path = str(tiny["teacher"])
    cfg.student.num_layers = 2
    cfg.data.train = str(tiny["train"])
    cfg.data.eval = str(tiny["eval"])
    cfg.data.cache_dir = str(tmp_path / "cache")
    cfg.data.max_eval_examples = None
    cfg.train.output_dir = str(tmp_path / "run")
    cfg.train.batch_size = 4
    cfg.train.max_steps = 4
    cfg.train.lr = 3e-3
    cfg.train.progress = False
    cfg.eval.enabled = False
    cfg.objective.chunk_size = 16
    for key, value in overrides.items():
        section, name = key.split(".", 1)
        target = getattr(cfg, section)
        while "." in name:
            head, name = name.split(".", 1)
            target = getattr(target, head)
        setattr(target, name, value)
    return validate(cfg)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps process-global state; each test starts from none."""
    yield
    try:
        from accelerate.state import AcceleratorState, GradientState, PartialState

        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        PartialState._reset_state()
    except Exception:  # pragma: no cover - older/newer accelerate without these helpers
        pass


@pytest.fixture(autouse=True)
def _kdlm_logs_reach_caplog(caplog):
    """kdlm's logger does not propagate to the root logger (where caplog listens): hand caplog its records directly."""
    import logging

    logger = logging.getLogger("kdlm")
    logger.addHandler(caplog.handler)
    yield
    logger.removeHandler(caplog.handler)


@pytest.fixture(scope="session")
def vllm_demo_teacher(tmp_path_factory):
    """A vLLM server (``make vllm``'s environment) serving the demo teacher on 127.0.0.1, shared by the session's
    slow tests and stopped at its end, also when a test fails. Model name: ``teacher``."""
    from kdlm.config import DEMO_TEACHER
    from kdlm.models import servable_folder
    from kdlm.vllm_server import VLLMServer

    log_path = tmp_path_factory.mktemp("vllm") / "server.log"
    with VLLMServer(servable_folder(DEMO_TEACHER), served_name="teacher", log_path=log_path) as server:
        yield server
