"""Before training: a warning when the fine-tuned model would never learn to stop."""
from __future__ import annotations

import copy

from factory import tiny_tokenizer

from loraforge import data as D


def chats(n: int, answer: str = "the answer") -> list[D.Example]:
    return [D.parse_record({"messages": [{"role": "user", "content": f"question {i}"},
                                         {"role": "assistant", "content": answer}]}, f"row {i}") for i in range(n)]


def test_a_template_that_ends_turns_with_the_stop_token_is_quiet():
    tok = tiny_tokenizer()
    assert D.stop_notes(chats(5), tok, {tok.eos_token_id}, max_len=256) == []


def test_a_turn_end_generation_does_not_stop_at_is_reported():
    tok = copy.deepcopy(tiny_tokenizer())
    tok.chat_template = tok.chat_template.replace("'<|im_end|>'", "'<|endoftext|>'")
    (note,) = D.stop_notes(chats(5), tok, {tok.convert_tokens_to_ids("<|im_end|>")}, max_len=256)
    assert "5 of 5 answers end with token '<|endoftext|>'" in note and "would not learn to stop" in note


def test_max_len_cutting_the_end_of_most_turns_is_reported():
    tok = tiny_tokenizer()
    (note,) = D.stop_notes(chats(4, answer="a long answer " * 20), tok, {tok.eos_token_id}, max_len=40)
    assert "max_len=40 cuts the end-of-turn token off 4 of 4 examples" in note
