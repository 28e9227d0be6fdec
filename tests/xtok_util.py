"""Two small BPE tokenizers of different families, built (not downloaded) for the cross-tokenizer tests.

* ``byte_level``: GPT-2 style (byte-level pre-tokenizer, 'Ġ' = a leading space), like SmolLM2's;
* ``metaspace``: Llama/SentencePiece style ('▁' = a space, byte fallback ``<0xNN>`` for characters outside the
  vocabulary), optionally without byte fallback (unknown characters become ``<unk>``).

Given ``merges`` the tokenisation is fixed by hand (tests of the alignment); with ``train_texts`` the merges are
learned with the tokenizers library's BPE trainer (tests that train models).
"""

from __future__ import annotations

from typing import Optional

from conftest import CHAT_TEMPLATE

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
# A second chat template, so that each model sees its own: the teacher's markers are not the student's.
OTHER_CHAT_TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}]: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant]: {% endif %}"
)


def _wrap(backend, chat_template: str):
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def _merged_vocab(alphabet: list[str], merges: list[tuple[str, str]]) -> dict[str, int]:
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for tok in alphabet + [a + b for a, b in merges]:
        vocab.setdefault(tok, len(vocab))
    return vocab


def byte_level(merges: Optional[list[tuple[str, str]]] = None, train_texts: Optional[list[str]] = None,
               vocab_size: int = 400, chat_template: str = CHAT_TEMPLATE):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    if train_texts is None:
        merges = merges or []
        backend = Tokenizer(models.BPE(vocab=_merged_vocab(alphabet, merges), merges=merges))
    else:
        backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    if train_texts is not None:
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=alphabet,
                                      show_progress=False)
        backend.train_from_iterator(train_texts, trainer)
    return _wrap(backend, chat_template)


def metaspace(merges: Optional[list[tuple[str, str]]] = None, train_texts: Optional[list[str]] = None,
              vocab_size: int = 500, byte_fallback: bool = True, chars: str = "", chat_template: str = OTHER_CHAT_TEMPLATE):
    """``chars``: characters of the base alphabet (hand-made merges); training learns its own."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    byte_tokens = [f"<0x{i:02X}>" for i in range(256)] if byte_fallback else []
    if train_texts is None:
        merges = merges or []
        alphabet = byte_tokens + sorted(set(chars) | {"▁"} | {c for pair in merges for part in pair for c in part})
        backend = Tokenizer(models.BPE(vocab=_merged_vocab(alphabet, merges), merges=merges, unk_token="<unk>",
                                       byte_fallback=byte_fallback))
    else:
        backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=byte_fallback))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    if train_texts is not None:
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS + byte_tokens, show_progress=False)
        backend.train_from_iterator(train_texts, trainer)
    return _wrap(backend, chat_template)


TRAIN_TEXTS = [
    "The sky is blue because air scatters blue light more than red light.",
    "An apple is a fruit that grows on trees; apples can be red, green or yellow.",
    "Two plus two is four, and three times three is nine.",
    "Hello there! How are you today? I am fine, thank you.",
    "Cows drink water and eat grass in the fields all day long.",
    "Mars is a planet, the fourth from the sun, and it looks red.",
    "Ice is frozen water: it melts at zero degrees Celsius.",
    "One, two, three, four, five: counting is easy.",
    "Bread is made from flour, water, salt and yeast.",
    "A café in Zürich serves crème brûlée — naïve, but tasty.",
]
