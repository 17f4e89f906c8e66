"""Text generation with transformers' ``generate`` (greedy by default), and the ``generate`` command."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from loraforge import LoraError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def generate_text(model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase", prompts: list[str],
                  max_new_tokens: int = 64, chat: bool = False, temperature: float = 0.0) -> list[str]:
    """Complete each prompt (batched, left padded); greedy unless temperature > 0.

    Returns only the new text (``completion_text``). ``chat=True`` wraps each prompt as a
    user message with the tokenizer's chat template and the assistant generation prompt.
    """
    if not prompts:
        return []
    from transformers import GenerationConfig

    texts, add_special = _prompt_texts(tokenizer, prompts, chat), not chat
    eos = getattr(model.generation_config, "eos_token_id", None)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else None,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id if eos is None else eos,
    )
    side, was_training = tokenizer.padding_side, model.training
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=add_special)
        batch = batch.to(model.device)
        model.eval()
        with torch.inference_mode():
            out = model.generate(**batch, generation_config=config)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    new_tokens = out[:, batch["input_ids"].shape[1]:]
    return [completion_text(tokenizer, ids) for ids in new_tokens.tolist()]


def completion_text(tokenizer: "PreTrainedTokenizerBase", new_ids: list[int]) -> str:
    """The one rule from generated token ids to text, for generate, eval and serve: decode with
    special tokens (eos, padding) dropped, nothing stripped: a leading space the model generated
    is part of its answer, as in the OpenAI API. Comparisons (exact match) strip on their own."""
    return tokenizer.decode(new_ids, skip_special_tokens=True)


def _prompt_texts(tokenizer: "PreTrainedTokenizerBase", prompts: list[str], chat: bool) -> list[str]:
    if not chat:
        return list(prompts)
    if not tokenizer.chat_template:
        raise LoraError(f"tokenizer '{tokenizer.name_or_path}' has no chat template; use chat=False")
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]


def cli_generate(args) -> int:
    from loraforge.models.loading import load_for_inference

    model, tokenizer = load_for_inference(args.model, args.adapter, quantize=args.quantize)
    text = generate_text(model, tokenizer, [args.prompt], args.max_tokens, chat=args.chat,
                         temperature=args.temperature)[0]
    print(text)
    return 0
