"""The one home of "messages -> prompt ids": the trainer (data.encode) and the server
(serve.api.chat_prompt) both build a chat's ids here, so a fine-tuned model sees at serving time
exactly the prompt tokens it was trained on.

The template is rendered to text first and the text tokenised without the tokenizer's own
special tokens: a chat template writes its own (bos, ``<|im_start|>``), and adding them again
would put a second bos in front of every prompt.
"""
from __future__ import annotations

from typing import Any

__all__ = ["chat_prompt_ids", "render_chat"]


def render_chat(tokenizer: Any, messages: list[dict], add_generation_prompt: bool = True, **template_kwargs) -> str:
    """The chat as the tokenizer's template writes it (ends with the assistant header when
    add_generation_prompt); `template_kwargs` go to the template (e.g. tools=[...])."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False,
                                         **template_kwargs)


def chat_prompt_ids(tokenizer: Any, messages: list[dict], add_generation_prompt: bool = True,
                    add_special_tokens: bool = False, **template_kwargs) -> list[int]:
    """Token ids of a chat prompt, as training builds them and serving generates from them."""
    text = render_chat(tokenizer, messages, add_generation_prompt, **template_kwargs)
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
