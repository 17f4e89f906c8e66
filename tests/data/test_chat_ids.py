"""The template check: the prompt ids the trainer builds for a chat are the ids `serve` builds
for the same messages (one function, data.chat.chat_prompt_ids), and the full training row is
the template's own rendering of the whole conversation."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
from factory import tiny_tokenizer

from loraforge import data as D
from loraforge.data.chat import chat_prompt_ids
from loraforge.serve import protocol as P
from loraforge.serve.api import chat_prompt

CHATS = {
    "one turn": [{"role": "user", "content": "What is the capital of France?"},
                 {"role": "assistant", "content": "Paris."}],
    "system": [{"role": "system", "content": "Answer in one short sentence."},
               {"role": "user", "content": "Translate to French: good morning."},
               {"role": "assistant", "content": "Bonjour."}],
    "several turns": [{"role": "system", "content": "You are terse."},
                      {"role": "user", "content": "Write a haiku about the sea."},
                      {"role": "assistant", "content": "Waves fold into wind."},
                      {"role": "user", "content": "Now one about the evening."},
                      {"role": "assistant", "content": "The evening is quiet."}],
}


def serve_ids(tok, messages: list[dict]) -> list[int]:
    state = SimpleNamespace(engine=SimpleNamespace(tokenizer=tok, context=4096), max_prompt_chars=10 ** 6)
    return list(chat_prompt(state, [P.ChatMessage(**m) for m in messages]))


def trainer_row(tok, messages: list[dict]) -> tuple[list[int], list[int]]:
    return D.encode_example(D.parse_record({"messages": messages}, "row"), tok, max_len=4096)


@pytest.mark.parametrize("name", sorted(CHATS))
def test_trainer_prompt_ids_equal_serve_prompt_ids(name):
    tok = tiny_tokenizer()
    messages = CHATS[name]
    ids, labels = trainer_row(tok, messages)
    n_prompt = labels.index(next(t for t in labels if t != -100))
    served = serve_ids(tok, messages[:-1])
    assert ids[:n_prompt] == served  # the trainer's prompt, -100 labelled, is what serve generates from
    assert chat_prompt_ids(tok, messages[:-1]) == served


@pytest.mark.parametrize("name", sorted(CHATS))
def test_training_row_is_the_templates_rendering_of_the_whole_chat(name):
    tok = tiny_tokenizer()
    ids, labels = trainer_row(tok, CHATS[name])
    oracle = tok(tok.apply_chat_template(CHATS[name], tokenize=False), add_special_tokens=False)["input_ids"]
    assert oracle[-1] == tok.convert_tokens_to_ids("\u010a")  # ChatML writes "\n" after <|im_end|> ...
    assert ids == oracle[:-1]  # ... the trainer stops at <|im_end|>, the token generation stops at
    assert ids[-1] == tok.eos_token_id and labels[-1] == tok.eos_token_id


def test_a_template_with_a_bos_gets_it_once_in_training_and_serving():
    tok = copy.deepcopy(tiny_tokenizer())
    tok.chat_template = "{{ '<|endoftext|>' }}" + tok.chat_template  # a template that writes its own bos
    messages = CHATS["system"]
    ids, _ = trainer_row(tok, messages)
    served = serve_ids(tok, messages[:-1])
    assert served[0] == tok.convert_tokens_to_ids("<|endoftext|>") and served[1] != served[0]
    assert ids[:len(served)] == served
