"""Alignment of two tokenisations of one text (kdlm.data.align), on hand-made strings and hand-built tokenizers.

Expected segments are worked out by hand from the tokens listed in each test's comment.
"""

from __future__ import annotations

import pytest

from kdlm.data.align import (
    AlignmentError,
    Segment,
    align_tokenisations,
    cut_positions,
    token_surfaces,
    tokenise_with_offsets,
)
from xtok_util import TRAIN_TEXTS, byte_level, metaspace

STUDENT_MERGES = [("h", "e"), ("l", "l"), ("ll", "o"), ("Ġ", "w"), ("Ġw", "o"), ("Ġwo", "r"), ("Ġwor", "l"),
                  ("Ġworl", "d"), ("Ġ", "b")]
TEACHER_MERGES = [("▁", "h"), ("▁h", "e"), ("▁he", "l"), ("▁hel", "l"), ("▁hell", "o"), ("▁", "w"), ("o", "r"),
                  ("l", "d")]


def segments_of(student_tok, teacher_tok, text: str) -> list[tuple]:
    s, t = tokenise_with_offsets(student_tok, text), tokenise_with_offsets(teacher_tok, text)
    segs = align_tokenisations(s, t, text, student_unk=student_tok.unk_token_id, teacher_unk=teacher_tok.unk_token_id,
                               student_surfaces=token_surfaces(student_tok), teacher_surfaces=token_surfaces(teacher_tok))
    return [(g.s_start, g.s_stop, g.t_start, g.t_stop, g.kind, g.usable) for g in segs]


@pytest.fixture(scope="module")
def pair():
    return byte_level(merges=STUDENT_MERGES), metaspace(merges=TEACHER_MERGES, chars="abdehlorw\n")


def test_student_token_spanning_teacher_tokens_and_the_reverse(pair):
    # student: he | llo | Ġworld        teacher: ▁hello | ▁w | or | ld
    assert segments_of(*pair, "hello world") == [(0, 2, 0, 1, "n:1", True), (2, 3, 1, 4, "1:n", True)]


def test_whitespace_runs_and_newlines(pair):
    # student: a | Ġ | Ġb | Ċ | Ċ | b          teacher: ▁ a (both on character 0) | ▁ | ▁ | b | \n | \n | b
    assert segments_of(*pair, "a  b\n\nb") == [
        (0, 1, 0, 2, "1:n", True), (1, 2, 2, 3, "1:1", True), (2, 3, 3, 5, "1:n", True),
        (3, 4, 5, 6, "1:1", True), (4, 5, 6, 7, "1:1", True), (5, 6, 7, 8, "1:1", True),
    ]


def test_unicode_and_byte_fallback_align_byte_by_byte(pair):
    # student (byte-level): 3 one-byte pieces of 日, 3 of 本, Ġ, 4 of 🙂;
    # teacher: ▁ (a space the text does not have) + 3 byte-fallback tokens <0xE6><0x97><0xA5> for 日, 3 for 本, ▁, 4.
    # 日: the bytes differ (the teacher's leading ▁), so one 3:4 segment; 本 and 🙂: byte for byte, 1:1.
    assert segments_of(*pair, "日本 🙂") == [
        (0, 3, 0, 4, "n:m", True), (3, 4, 4, 5, "1:1", True), (4, 5, 5, 6, "1:1", True), (5, 6, 6, 7, "1:1", True),
        (6, 7, 7, 8, "1:1", True), (7, 8, 8, 9, "1:1", True), (8, 9, 9, 10, "1:1", True), (9, 10, 10, 11, "1:1", True),
        (10, 11, 11, 12, "1:1", True),
    ]


def test_token_surfaces(pair):
    student, teacher = pair
    s_surf, t_surf = token_surfaces(student), token_surfaces(teacher)
    assert s_surf[student.convert_tokens_to_ids("Ġworld")] == b" world"
    assert s_surf[student.convert_tokens_to_ids("Ĺ")] == b"\x97"  # GPT-2's byte-to-unicode table: 0x97 -> 'Ĺ'
    assert t_surf[teacher.convert_tokens_to_ids("▁hello")] == b" hello"
    assert t_surf[teacher.convert_tokens_to_ids("<0xE6>")] == b"\xe6"
    assert s_surf[student.eos_token_id] is None and t_surf[teacher.convert_tokens_to_ids("<|user|>")] is None


def test_a_token_across_two_characters_merges_their_segments(pair):
    # A student merge of 日's last byte with 本's first ('¥æ' covers characters 0..2): no cut between the characters
    # (and the teacher's leading ▁ keeps the bytes from lining up).
    student = byte_level(merges=[("¥", "æ")])
    assert segments_of(student, pair[1], "日本") == [(0, 5, 0, 7, "n:m", True)]


def test_unknown_token_makes_its_segment_unusable(pair):
    # teacher without byte fallback: ▁h | <unk> (é) | l | l | o;   student: h | Ã © (é in bytes) | llo
    teacher = metaspace(merges=TEACHER_MERGES, chars="abdehlorw", byte_fallback=False)
    assert segments_of(pair[0], teacher, "héllo") == [
        (0, 1, 0, 1, "1:1", True), (1, 3, 1, 2, "n:1", False), (3, 4, 2, 5, "1:n", True),
    ]


def test_identical_tokenizers_align_one_to_one():
    tok = byte_level(train_texts=TRAIN_TEXTS)
    for text in TRAIN_TEXTS:
        segs = segments_of(tok, tok, text)
        n = len(tok(text, add_special_tokens=False)["input_ids"])
        assert segs == [(i, i + 1, i, i + 1, "1:1", True) for i in range(n)]


def test_trained_tokenizers_of_different_families_align_every_text():
    student, teacher = byte_level(train_texts=TRAIN_TEXTS, vocab_size=300), metaspace(train_texts=TRAIN_TEXTS, vocab_size=420)
    for text in TRAIN_TEXTS:
        segs = segments_of(student, teacher, text)
        s_ids = student(text, add_special_tokens=False)["input_ids"]
        t_ids = teacher(text, add_special_tokens=False)["input_ids"]
        # Contiguous, complete cover of both sequences; each segment decodes to the same text on both sides.
        assert segs[0][0] == segs[0][2] == 0 and segs[-1][1] == len(s_ids) and segs[-1][3] == len(t_ids)
        for (a, b, c, d, *_), nxt in zip(segs, segs[1:] + [None]):
            if nxt is not None:
                assert (b, d) == (nxt[0], nxt[2])
            assert student.decode(s_ids[a:b]).strip() == teacher.decode(t_ids[c:d]).strip()


def test_cut_positions_uncovered_whitespace_and_failures():
    # Trimmed offsets: the space between 'a' and 'b' belongs to no token, so a cut may sit on either side of it.
    assert cut_positions([(0, 1), (2, 3)], "a b") == {0: 0, 1: 1, 2: 1, 3: 2}
    with pytest.raises(AlignmentError, match="'x' at characters 1..2 is covered by no token"):
        cut_positions([(0, 1), (2, 3)], "axb")
    with pytest.raises(AlignmentError, match="outside the text"):
        cut_positions([(0, 5)], "abc")
    with pytest.raises(AlignmentError, match="'c'"):  # the text's end is not covered
        cut_positions([(0, 1), (1, 2)], "abc")


def test_segment_kind():
    assert [Segment(0, 1, 0, 1).kind, Segment(0, 1, 0, 3).kind, Segment(0, 2, 0, 1).kind, Segment(0, 2, 0, 2).kind] == [
        "1:1", "1:n", "n:1", "n:m"]
