"""A tiny ChatML tokenizer built in code, so tests never download anything.

    from tokenizer_fixture import tiny_tokenizer
    tok = tiny_tokenizer()          # cached; treat it as read-only

A byte-level BPE (every string encodes, no unknown tokens) trained in a few milliseconds on the
demo-task text plus some plain English, with SmolLM2's special tokens at ids 0, 1, 2 and a
SmolLM2-style ChatML ``chat_template``. eos is ``<|im_end|>`` (the end of an assistant turn),
pad is ``<|endoftext|>``.
"""
from __future__ import annotations

import functools

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 512

# SmolLM2-135M-Instruct's template: a default system prompt, ChatML turns.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

ENGLISH = [
    "The quick brown fox jumps over the lazy dog.",
    "You are a helpful AI assistant.",
    "Answer the question in one short sentence.",
    "What is the capital of France? Paris is the capital of France.",
    "Translate to French: good morning. Bonjour.",
    "Write a haiku about the sea and the wind in the evening.",
    "Low-rank adaptation trains two small matrices instead of the full weight.",
    "Summarise the text below, then list three key points.",
]


def _corpus() -> list[str]:
    from loraforge.demotask import TASKS, make_examples

    lines = list(ENGLISH)
    for task in TASKS:
        for row in make_examples(150, seed=123, task=task):
            lines += [m["content"] for m in row["messages"]]
    return lines


@functools.lru_cache(maxsize=None)
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """The shared test tokenizer (about 512 tokens); the same ids on every build."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>", additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHATML_TEMPLATE
    return fast
