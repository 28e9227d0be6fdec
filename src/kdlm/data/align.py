"""Aligning two tokenisations of one text, for distillation across tokenizers (``objective.cross_tokenizer``).

The same response text is tokenised by the teacher's and the student's tokenizer. Each token covers a span of
characters (the fast tokenizers' ``offset_mapping``). A *cut* is a place between two tokens where every token
before it ends at or before some character position and every token after it starts at or after it; tokens that
split one character into bytes (byte fallback ``<0xE6>``, byte-level BPE pieces of a multi-byte character) share
or overlap character spans, so there is never a cut inside a character. A run of whitespace that no token covers
(tokenizers that trim offsets) may hold a cut anywhere inside it.

Cuts at the same character position in both tokenisations split the text into *segments*: consecutive student
tokens and consecutive teacher tokens that spell exactly the same text, with the same text before them. A segment
is 1:1 (one token each side), 1:n (one student token, several teacher tokens), n:1, or n:m. Both models' next-token
distributions at a segment's first token condition on the same text, so they are comparable there; the segment's
probability (the chained product over its tokens) is comparable for every segment.

An alignment *fails* (the example is dropped and counted) when a tokenizer leaves non-whitespace text uncovered or
its offsets run outside the text, i.e. when the two token sequences cannot be shown to spell the same text.
Segments holding an unknown token (``unk``) are kept in the layout but flagged unusable: the unknown token does not
spell its text, so no probability of that text can be read from it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import torch

from kdlm.data.format import IGNORE, DropCounts, Tokenized, collate, tokenize_examples
from kdlm.data.sources import Example
from kdlm.errors import DataError


class AlignmentError(ValueError):
    """The two tokenisations of a text cannot be aligned (reason in the message)."""


@dataclass(frozen=True)
class Segment:
    """Student tokens ``[s_start, s_stop)`` and teacher tokens ``[t_start, t_stop)`` spell the same text span."""

    s_start: int
    s_stop: int
    t_start: int
    t_stop: int
    usable: bool = True
    """False when a token of the segment is the tokenizer's unknown token (its text has no probability)."""

    @property
    def kind(self) -> str:
        """'1:1', '1:n' (one student token, several teacher tokens), 'n:1' or 'n:m'."""
        s, t = self.s_stop - self.s_start, self.t_stop - self.t_start
        return f"{'1' if s == 1 else 'n'}:{'1' if t == 1 else ('n' if s == 1 else 'm')}"


@dataclass
class Tokenisation:
    """Token ids of a text and each token's character span ``[start, end)``."""

    ids: list[int]
    offsets: list[tuple[int, int]]


def tokenise_with_offsets(tokenizer, text: str) -> Tokenisation:
    """Tokenise ``text`` without special tokens, with character offsets (a fast tokenizer is required)."""
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(
            f"cross-tokenizer alignment needs a fast tokenizer (character offsets); {type(tokenizer).__name__} is not "
            "one: load it with use_fast=True or convert it with the tokenizers library"
        )
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return Tokenisation(list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]])


def cut_positions(offsets: list[tuple[int, int]], text: str) -> dict[int, int]:
    """Character position -> number of tokens before the cut at that position, for every possible cut.

    Raises :class:`AlignmentError` when the tokens leave non-whitespace text uncovered or run outside the text.
    """
    n, length = len(offsets), len(text)
    for index, (start, end) in enumerate(offsets):
        if not 0 <= start <= end <= length:
            raise AlignmentError(f"token {index} has offsets ({start}, {end}) outside the text of {length} characters")
    # prefix_end[i] = furthest end among tokens < i; suffix_start[i] = nearest start among tokens >= i.
    prefix_end = [0] * (n + 1)
    for i, (_, end) in enumerate(offsets):
        prefix_end[i + 1] = max(prefix_end[i], end)
    suffix_start = [length] * (n + 1)
    for i in range(n - 1, -1, -1):
        suffix_start[i] = min(suffix_start[i + 1], offsets[i][0])
    cuts: dict[int, int] = {}
    for i in range(n + 1):  # a cut before token i (i = n: after the last token)
        low, high = prefix_end[i], suffix_start[i]
        if low > high:
            continue  # tokens i-1 and i overlap (pieces of one character): no cut between them
        gap = text[low:high]
        if gap.strip():
            raise AlignmentError(f"text {gap[:20]!r} at characters {low}..{high} is covered by no token")
        for position in range(low, high + 1):
            cuts.setdefault(position, i)  # inside an uncovered whitespace run: the earliest cut owns it
    return cuts


def token_surfaces(tokenizer) -> list[Optional[bytes]]:
    """The bytes each token id spells, by id (None for special and added tokens, which spell no text).

    Read from the vocabulary as the tokenizer's decoder would: byte-level BPE (GPT-2, SmolLM2, Llama-3, Qwen) maps
    each character of the token back to a byte through GPT-2's byte-to-unicode table; SentencePiece-style tokenizers
    (Llama-2, Mistral) write a space as '▁' and byte-fallback tokens as ``<0xNN>``; anything else is its UTF-8.
    """
    import json

    from transformers.convert_slow_tokenizer import bytes_to_unicode

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    decoder = json.dumps(state.get("decoder"))
    byte_level = '"ByteLevel"' in decoder
    byte_fallback = bool(state.get("model", {}).get("byte_fallback"))
    to_byte = {char: byte for byte, char in bytes_to_unicode().items()}
    special = set(tokenizer.all_special_ids) | {int(i) for i in tokenizer.added_tokens_decoder}
    surfaces: list[Optional[bytes]] = [None] * (max(tokenizer.get_vocab().values()) + 1)
    for token, index in tokenizer.get_vocab().items():
        if index in special:
            continue
        if byte_level and all(char in to_byte for char in token):
            surfaces[index] = bytes(to_byte[char] for char in token)
        elif byte_fallback and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            surfaces[index] = bytes([int(token[3:5], 16)])
        else:
            surfaces[index] = token.replace("▁", " ").encode("utf-8")
    return surfaces


def _token_keys(tokenizer, vocab: int) -> dict[tuple, int]:
    """What each id < ``vocab`` stands for -> the smallest id that stands for it: ('eos',), ('special', content) or
    ('text', bytes)."""
    surfaces = token_surfaces(tokenizer)
    id_to_token = {index: token for token, index in tokenizer.get_vocab().items()}
    keys: dict[tuple, int] = {}
    for index in range(min(vocab, len(surfaces))):
        if index == tokenizer.eos_token_id:
            key: tuple = ("eos",)  # both models' end of response, whatever each calls it
        elif surfaces[index] is None:
            if index not in id_to_token:
                continue
            key = ("special", id_to_token[index])
        else:
            key = ("text", surfaces[index])
        keys.setdefault(key, index)
    return keys


def shared_vocabulary(student_tokenizer, teacher_tokenizer, student_vocab: int, teacher_vocab: int) -> list[tuple[int, int]]:
    """(student id, teacher id) pairs of tokens that spell the same bytes (special tokens: the same name; eos ↔ eos).

    Only ids below each model's real vocabulary size count; when several ids spell the same bytes the smallest is
    paired and the others stay unpaired.
    """
    s_keys = _token_keys(student_tokenizer, student_vocab)
    t_keys = _token_keys(teacher_tokenizer, teacher_vocab)
    return sorted((index, t_keys[key]) for key, index in s_keys.items() if key in t_keys)


def _split_by_bytes(segment: Segment, s_surfaces: list[bytes], t_surfaces: list[bytes]) -> list[Segment]:
    """Split a segment at every byte position where both sides' tokens end, when both spell the same bytes.

    Character offsets cannot cut inside a character; the tokens' bytes can: the pieces of 'é' under two byte-level
    tokenizers align one to one, and identical tokenizers align every token one to one.
    """
    if b"".join(s_surfaces) != b"".join(t_surfaces):
        return [segment]  # e.g. a '▁' that stands for a space the text does not have: keep the whole segment
    s_ends, t_ends, total = {}, {}, 0
    for index, piece in enumerate(s_surfaces):
        total += len(piece)
        s_ends[total] = index + 1
    total = 0
    for index, piece in enumerate(t_surfaces):
        total += len(piece)
        t_ends[total] = index + 1
    pieces, s_prev, t_prev = [], 0, 0
    for position in sorted(set(s_ends) & set(t_ends)):
        s_cut, t_cut = s_ends[position], t_ends[position]
        if s_cut <= s_prev or t_cut <= t_prev:
            continue  # zero-length tokens join the next piece
        pieces.append(Segment(segment.s_start + s_prev, segment.s_start + s_cut, segment.t_start + t_prev,
                              segment.t_start + t_cut, segment.usable))
        s_prev, t_prev = s_cut, t_cut
    return pieces if (s_prev, t_prev) == (segment.s_stop - segment.s_start, segment.t_stop - segment.t_start) else [segment]


def align_tokenisations(
    student: Tokenisation,
    teacher: Tokenisation,
    text: str,
    *,
    student_unk: Optional[int] = None,
    teacher_unk: Optional[int] = None,
    student_surfaces: Optional[list[Optional[bytes]]] = None,
    teacher_surfaces: Optional[list[Optional[bytes]]] = None,
) -> list[Segment]:
    """The segments of ``text`` shared by the two tokenisations, in order, covering every token of both.

    With both tokenizers' :func:`token_surfaces`, segments of several tokens on both sides are split further where
    the tokens' bytes allow (see :func:`_split_by_bytes`). Raises :class:`AlignmentError` when either tokenisation
    does not spell ``text`` (see the module doc).
    """
    s_cuts, t_cuts = cut_positions(student.offsets, text), cut_positions(teacher.offsets, text)
    n_s, n_t = len(student.ids), len(teacher.ids)
    segments: list[Segment] = []
    s_prev = t_prev = 0
    for position in sorted(set(s_cuts) & set(t_cuts)):
        s_cut, t_cut = s_cuts[position], t_cuts[position]
        # A cut with no new token on one side (an uncovered whitespace run, or a zero-width token) merges into the
        # next segment: every segment has at least one token on each side.
        if s_cut <= s_prev or t_cut <= t_prev:
            continue
        unknown = (student_unk is not None and student_unk in student.ids[s_prev:s_cut]) or (
            teacher_unk is not None and teacher_unk in teacher.ids[t_prev:t_cut]
        )
        segment = Segment(s_prev, s_cut, t_prev, t_cut, usable=not unknown)
        s_bytes = [student_surfaces[i] for i in student.ids[s_prev:s_cut]] if student_surfaces is not None else [None]
        t_bytes = [teacher_surfaces[i] for i in teacher.ids[t_prev:t_cut]] if teacher_surfaces is not None else [None]
        if segment.kind == "n:m" and None not in s_bytes and None not in t_bytes:
            segments.extend(_split_by_bytes(segment, s_bytes, t_bytes))
        else:
            segments.append(segment)
        s_prev, t_prev = s_cut, t_cut
    if (s_prev, t_prev) != (n_s, n_t):
        raise AlignmentError(
            f"the tokenisations do not end together: {s_prev} of {n_s} student and {t_prev} of {n_t} teacher tokens aligned"
        )
    return segments


@dataclass
class AlignStats:
    """What aligning a data set did: examples aligned or dropped, and segments by kind."""

    aligned: int = 0
    failed: int = 0
    segments: Counter = field(default_factory=Counter)
    """'1:1', '1:n', 'n:1', 'n:m' and 'unusable' (holding an unknown token) segment counts."""
    examples: list[str] = field(default_factory=list)
    """Up to three origins and reasons of failed examples."""

    def note_failure(self, origin: str, reason: str) -> None:
        self.failed += 1
        if len(self.examples) < 3:
            self.examples.append(f"{origin}: {reason}")

    def note_segments(self, segments: list[Segment]) -> None:
        self.aligned += 1
        for segment in segments:
            self.segments[segment.kind if segment.usable else "unusable"] += 1

    def summary(self, name: str) -> str:
        kinds = ", ".join(f"{k} {self.segments[k]}" for k in ("1:1", "1:n", "n:1", "n:m", "unusable") if self.segments[k])
        text = f"{name}: cross-tokenizer alignment of {self.aligned + self.failed} responses: {self.aligned} aligned"
        text += f" (segments {kinds or 'none'})"
        if self.failed:
            text += f", {self.failed} dropped (e.g. {'; '.join(self.examples)})"
        return text

    def as_dict(self) -> dict:
        return {"aligned": self.aligned, "failed": self.failed, "segments": dict(self.segments), "examples": self.examples}


# --------------------------------------------------------------------------------------------------
# Training data with both tokenisations.
# --------------------------------------------------------------------------------------------------


@dataclass
class PairedTokenized(Tokenized):
    """A student sequence (the :class:`Tokenized` fields) with the teacher's own sequence and the alignment.

    Alignment lists are in *response* coordinates (index 0 = first response token, eos included when kept):
    ``pair[j]`` = the teacher response token that starts the same segment as student response token j (−1: j
    starts no usable segment); ``student_segments[j]`` / ``teacher_segments[i]`` = the local number of the segment
    holding the token when that segment is not one token each side (−1 otherwise).
    """

    teacher_input_ids: list[int] = field(default_factory=list)
    teacher_prompt_length: int = 0
    pair: list[int] = field(default_factory=list)
    student_segments: list[int] = field(default_factory=list)
    teacher_segments: list[int] = field(default_factory=list)

    @property
    def teacher_labels(self) -> list[int]:
        """The teacher sequence's labels as :class:`Tokenized` has them (IGNORE on its prompt): the teacher cache's key."""
        return [IGNORE] * self.teacher_prompt_length + self.teacher_input_ids[self.teacher_prompt_length:]


def _alignment_lists(segments: list[Segment], s_text: int, t_text: int, s_kept: int, t_kept: int):
    """pair / segment lists (see :class:`PairedTokenized`) for response lengths ``*_kept`` (text tokens + eos,
    possibly truncated): segments cut by truncation are left out; eos pairs with eos when both are kept."""
    pair, s_seg, t_seg = [-1] * s_kept, [-1] * s_kept, [-1] * t_kept
    number = 0
    for segment in segments:
        if not segment.usable or segment.s_stop > s_kept or segment.t_stop > t_kept:
            continue
        pair[segment.s_start] = segment.t_start
        if segment.kind != "1:1":
            s_seg[segment.s_start:segment.s_stop] = [number] * (segment.s_stop - segment.s_start)
            t_seg[segment.t_start:segment.t_stop] = [number] * (segment.t_stop - segment.t_start)
            number += 1
    if s_kept == s_text + 1 and t_kept == t_text + 1:
        pair[s_text] = t_text
    return pair, s_seg, t_seg


def tokenize_pairs(
    examples: list[Example],
    student_tokenizer,
    teacher_tokenizer,
    *,
    max_prompt_length: int,
    max_length: int,
    system_prompt: Optional[str] = None,
) -> tuple[list[PairedTokenized], DropCounts, AlignStats]:
    """Each example tokenised by both tokenizers, each with its own chat template, and aligned on the response.

    The response mask is the same text on both sides: the response is tokenised on its own (as
    :func:`kdlm.data.format.tokenize_examples` does) and the alignment is of that text. An example is kept when both
    sides keep it (``DropCounts``, either side's reason) and the alignment succeeds (``AlignStats``).
    """
    counts, stats = DropCounts(), AlignStats()
    s_unk, t_unk = student_tokenizer.unk_token_id, teacher_tokenizer.unk_token_id
    s_surfaces, t_surfaces = token_surfaces(student_tokenizer), token_surfaces(teacher_tokenizer)
    out: list[PairedTokenized] = []
    settings = dict(max_prompt_length=max_prompt_length, max_length=max_length, system_prompt=system_prompt)
    for example in examples:
        s_items, s_counts = tokenize_examples([example], student_tokenizer, **settings)
        t_items, t_counts = tokenize_examples([example], teacher_tokenizer, **settings)
        reason = next((r for r in ("prompt_too_long", "empty_response") if getattr(s_counts, r) or getattr(t_counts, r)), None)
        if reason is not None:
            counts.note(reason, example.origin)
            continue
        if s_counts.truncated_response or t_counts.truncated_response:
            counts.note("truncated_response", example.origin)
        (s_item,), (t_item,) = s_items, t_items
        try:
            s_text = tokenise_with_offsets(student_tokenizer, example.response)
            t_text = tokenise_with_offsets(teacher_tokenizer, example.response)
            segments = align_tokenisations(s_text, t_text, example.response, student_unk=s_unk, teacher_unk=t_unk,
                                           student_surfaces=s_surfaces, teacher_surfaces=t_surfaces)
        except AlignmentError as err:
            stats.note_failure(example.origin, str(err))
            continue
        stats.note_segments(segments)
        s_kept = len(s_item.input_ids) - s_item.prompt_length
        t_kept = len(t_item.input_ids) - t_item.prompt_length
        pair, s_seg, t_seg = _alignment_lists(segments, len(s_text.ids), len(t_text.ids), s_kept, t_kept)
        counts.kept += 1
        out.append(PairedTokenized(
            **vars(s_item), teacher_input_ids=t_item.input_ids, teacher_prompt_length=t_item.prompt_length,
            pair=pair, student_segments=s_seg, teacher_segments=t_seg,
        ))
    return out, counts, stats


def collate_pairs(items: list[PairedTokenized], pad_id: int, teacher_pad_id: int) -> dict[str, torch.Tensor]:
    """:func:`kdlm.data.format.collate` of the student side, plus the teacher side and the alignment:

    * ``teacher_input_ids`` / ``teacher_attention_mask`` / ``teacher_labels`` [B, L_T] (right-padded; the labels
      IGNORE on the teacher's prompt and padding, as ``labels``);
    * ``xtok_pair`` [B, L_S]: at a student token position, the row of ``teacher_hidden[:, :-1].reshape(-1, H)``
      that predicts the teacher token starting the same segment (−1: none) — read it like the labels, ``[:, 1:]``;
    * ``xtok_student_segment`` [B, L_S] / ``xtok_teacher_segment`` [B, L_T]: the segment of each token position,
      numbered across the batch (−1: none).
    """
    batch = collate(items, pad_id)
    width = max(len(item.teacher_input_ids) for item in items)
    rows, s_width = len(items), batch["input_ids"].shape[1]
    teacher_ids = torch.full((rows, width), teacher_pad_id, dtype=torch.long)
    teacher_mask = torch.zeros((rows, width), dtype=torch.long)
    teacher_labels = torch.full((rows, width), IGNORE, dtype=torch.long)
    pair = torch.full((rows, s_width), -1, dtype=torch.long)
    s_seg = torch.full((rows, s_width), -1, dtype=torch.long)
    t_seg = torch.full((rows, width), -1, dtype=torch.long)
    offset = 0
    for row, item in enumerate(items):
        n, s0, t0 = len(item.teacher_input_ids), item.prompt_length, item.teacher_prompt_length
        teacher_ids[row, :n] = torch.tensor(item.teacher_input_ids)
        teacher_mask[row, :n] = 1
        teacher_labels[row, :n] = torch.tensor(item.teacher_labels)
        for j, i in enumerate(item.pair):
            if i >= 0:  # teacher token t0 + i is predicted by teacher row t0 + i − 1
                pair[row, s0 + j] = row * (width - 1) + t0 + i - 1
        local = [k for k in item.student_segments if k >= 0]
        for j, k in enumerate(item.student_segments):
            if k >= 0:
                s_seg[row, s0 + j] = offset + k
        for i, k in enumerate(item.teacher_segments):
            if k >= 0:
                t_seg[row, t0 + i] = offset + k
        offset += max(local) + 1 if local else 0
    batch.update(teacher_input_ids=teacher_ids, teacher_attention_mask=teacher_mask, teacher_labels=teacher_labels, xtok_pair=pair,
                 xtok_student_segment=s_seg, xtok_teacher_segment=t_seg)
    return batch
