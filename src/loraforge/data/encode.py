"""Encoding and batching: ``Example`` -> token ids + loss masks -> packed, padded batches.

Each example becomes token ids and labels: the prompt is rendered with the tokenizer's chat
template, the answer is followed by the template's own end-of-turn marker, and labels are -100
on the prompt so only the answer is learned.

Packing puts several short examples into one row without letting them see each other: the
position ids restart at 0 for every example and the attention mask is block-diagonal causal.
It is passed as a 4D *additive float* mask (0 = attend, a very negative number = blocked),
which every attention backend of transformers 5.x reads the same way; a 4D bool mask is read
correctly by "sdpa" but not by "eager" (which adds the mask to the scores), and position ids
alone do not separate examples once the model builds a KV cache. tests/data/test_data.py
checks packed == unpacked logits.
"""
from __future__ import annotations

import bisect
import random
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from loraforge import LoraError
from loraforge.data.chat import chat_prompt_ids, render_chat
from loraforge.data.records import IGNORE_INDEX, Example, Pair

__all__ = ["EncodedSet", "answer_text", "batches", "block_causal_mask", "collate", "count_answer_tokens", "count_tokens",
           "encode_example", "encode_examples", "has_windows", "length_grouped", "n_trained", "one_per_row", "pack",
           "prompt_text", "shuffled", "stop_notes", "train_val_split"]

# ----------------------------------------------------------------------------- encoding


def _use_template(tokenizer: Any, chat_template: bool) -> bool:
    return chat_template and bool(getattr(tokenizer, "chat_template", None))


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return render_chat(tokenizer, messages, generation_prompt)


def prompt_text(example: Example, tokenizer: Any, chat_template: bool = True) -> str:
    """The prompt as the model sees it at generation time (template + generation prompt)."""
    if example.text is not None:
        raise LoraError(f"{example.where}: a plain-text example has no prompt to generate from")
    if _use_template(tokenizer, chat_template):
        return _render(tokenizer, example.messages, generation_prompt=True)
    if example.fmt == "completion":  # raw prompt/completion: the user controls all spacing
        return example.messages[-1]["content"]
    return "\n\n".join(m["content"] for m in example.messages) + "\n\n"


def answer_text(example: Example, tokenizer: Any, chat_template: bool = True) -> str:
    """What follows the prompt in training: the answer plus the template's end-of-turn marker.

    The marker is found generically: render the whole conversation, drop the prompt, and keep
    what the template writes around the answer (``<|im_end|>`` for ChatML). Trailing whitespace
    after the marker is dropped; without a template (or marker) the tokenizer's eos is used.
    """
    if example.answer is None:
        raise LoraError(f"{example.where}: a plain-text example has no answer")
    eos = tokenizer.eos_token or ""
    if not _use_template(tokenizer, chat_template):
        return example.answer + eos
    prompt = prompt_text(example, tokenizer, chat_template)
    full = _render(tokenizer, example.messages + [{"role": "assistant", "content": example.answer}], False)
    rest = full[len(prompt):] if full.startswith(prompt) else ""
    at = rest.find(example.answer)
    if at < 0:  # the template rewrites the answer or the prompt: fall back to answer + eos
        return example.answer + eos
    tail = rest[at + len(example.answer):].rstrip()
    return rest[:at] + example.answer + (tail or eos)


def _ids(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _encode_parts(example: Example, tokenizer: Any, chat_template: bool) -> Pair:
    """(prompt ids, answer ids), tokenised separately so training sees exactly the prompt
    tokens generation will see. Plain text is all answer, with eos appended."""
    if example.text is not None:
        ids = _ids(tokenizer, example.text, special=True)
        eos = tokenizer.eos_token_id
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        return [], ids
    if _use_template(tokenizer, chat_template):  # the ids serve builds for the same messages (data.chat)
        prompt = chat_prompt_ids(tokenizer, example.messages)
    else:
        prompt = _ids(tokenizer, prompt_text(example, tokenizer, chat_template), special=True)
    return prompt, _ids(tokenizer, answer_text(example, tokenizer, chat_template), special=False)


def _join(prompt: list[int], answer: list[int], train_on_prompt: bool, max_len: int) -> Pair:
    prompt_labels = prompt if train_on_prompt else [IGNORE_INDEX] * len(prompt)
    return (prompt + answer)[:max_len], (prompt_labels + answer)[:max_len]


def encode_example(example: Example, tokenizer: Any, train_on_prompt: bool = False,
                   max_len: int = 2048, chat_template: bool = True) -> Pair:
    """(input_ids, labels) of one example, cut to max_len; labels are -100 on the prompt
    unless train_on_prompt. Plain-text examples: eos appended, labels == input_ids."""
    prompt, answer = _encode_parts(example, tokenizer, chat_template)
    return _join(prompt, answer, train_on_prompt, max_len)


def stop_notes(examples: list[Example], tokenizer: Any, stop_ids: set[int], max_len: int,
               chat_template: bool = True, sample: int = 64) -> list[str]:
    """Warnings, before training, when the fine-tuned model would not learn to stop: the answer's
    last token (the template's end-of-turn marker, or eos) is not a token generation stops at, or
    max_len cuts it off most examples. Checks the first `sample` answered examples."""
    answered = [ex for ex in examples if ex.answer is not None][:sample]
    if not answered or not stop_ids:
        return []
    notes = []
    ends = [_encode_parts(ex, tokenizer, chat_template) for ex in answered]
    wrong = [answer[-1] for _, answer in ends if answer and answer[-1] not in stop_ids]
    if wrong:
        shown = tokenizer.convert_ids_to_tokens(wrong[0])
        notes.append(f"{len(wrong)} of {len(ends)} answers end with token {shown!r} (id {wrong[0]}), but generation "
                     f"stops at {sorted(stop_ids)}: the fine-tuned model would not learn to stop")
    cut = sum(len(prompt) + len(answer) > max_len for prompt, answer in ends)
    if cut > len(ends) // 2:
        notes.append(f"max_len={max_len} cuts the end-of-turn token off {cut} of {len(ends)} examples: the model "
                     f"would rarely learn to stop; raise --max-len")
    return notes


def n_trained(labels: list[int]) -> int:
    """Tokens the loss sees: label[0] is never predicted (nothing comes before it)."""
    return sum(1 for t in labels[1:] if t != IGNORE_INDEX)


@dataclass
class EncodedSet:
    """Encoded examples plus what truncation did to them."""

    pairs: list[Pair] = field(default_factory=list)
    truncated: int = 0  # examples cut to max_len that kept some answer tokens
    dropped: int = 0  # examples whose answer was cut away entirely, left out
    max_len: int = 0

    def note(self) -> str | None:
        """One line for the user when truncation changed anything, else None."""
        if not (self.truncated or self.dropped):
            return None
        return (f"max_len={self.max_len}: truncated {self.truncated} example(s); dropped "
                f"{self.dropped} whose answer did not fit")


def encode_examples(examples: list[Example], tokenizer: Any, train_on_prompt: bool = False,
                    max_len: int = 2048, chat_template: bool = True) -> EncodedSet:
    """Encode every example; drop (and count) those with no answer token left after truncation."""
    if max_len < 2:
        raise LoraError(f"max_len must be at least 2, got {max_len}")
    out = EncodedSet(max_len=max_len)
    for ex in examples:
        prompt, answer = _encode_parts(ex, tokenizer, chat_template)
        if n_trained(_join(prompt, answer, False, max_len)[1]) == 0:
            out.dropped += 1
            continue
        out.truncated += len(prompt) + len(answer) > max_len
        out.pairs.append(_join(prompt, answer, train_on_prompt, max_len))
    if not out.pairs:
        raise LoraError(f"no example keeps an answer token within max_len={max_len}; raise max_len")
    return out


# ----------------------------------------------------------------------------- packing


def _row(pairs: list[Pair]) -> dict[str, list[int]]:
    """Concatenate examples into one row; each example's first label becomes -100.

    The loss shifts labels left by one, so without that the last token of one example would be
    trained to predict the first token of the next one.
    """
    row: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": [], "seq_lens": []}
    for ids, labels in pairs:
        row["input_ids"] += ids
        row["labels"] += [IGNORE_INDEX] * min(1, len(labels)) + labels[1:]
        row["position_ids"] += list(range(len(ids)))
        row["seq_lens"].append(len(ids))
    return row


def _assign_rows(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Best-fit decreasing: longest first, each into the fullest row it still fits in."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (tokens left, row index), kept sorted
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        at = bisect.bisect_left(free, (lengths[i], -1))
        if at == len(free):
            rows.append([i])
            left, r = max_tokens - lengths[i], len(rows) - 1
        else:
            left, r = free.pop(at)
            rows[r].append(i)
            left -= lengths[i]
        if left > 0:
            bisect.insort(free, (left, r))
    return [sorted(r) for r in rows]


def pack(encoded: list[Pair], max_tokens: int) -> list[dict[str, list[int]]]:
    """Pack examples into rows of at most max_tokens tokens, examples isolated from each other.

    A row is {"input_ids", "labels", "position_ids" (restarting at 0 per example), "seq_lens"};
    ``collate`` turns seq_lens into the block-diagonal causal attention mask.
    """
    for i, (ids, _) in enumerate(encoded):
        if len(ids) > max_tokens:
            raise LoraError(f"example {i} has {len(ids)} tokens, more than max_tokens={max_tokens}; "
                            f"set max_len <= max_tokens")
    groups = _assign_rows([len(ids) for ids, _ in encoded], max_tokens)
    return [_row([encoded[i] for i in group]) for group in groups]


def one_per_row(encoded: list[Pair]) -> list[dict[str, list[int]]]:
    """Rows without packing (one example each), in the same form as ``pack``'s."""
    return [_row([pair]) for pair in encoded]


def block_causal_mask(seq_lens: list[int], length: int) -> torch.Tensor:
    """(length, length) bool, True where query i may attend key j: same example and j <= i.

    Padding after the examples attends only to itself (a fully blocked row would give NaN).
    """
    n_pad = length - sum(seq_lens)
    seg = torch.repeat_interleave(torch.arange(len(seq_lens)), torch.tensor(seq_lens, dtype=torch.long))
    seg = torch.cat([seg, -1 - torch.arange(n_pad)])  # (length,) example index; pads unique < 0
    same = seg[:, None] == seg[None, :]  # (length, length)
    return same & torch.ones(length, length, dtype=torch.bool).tril()


def has_windows(config) -> bool:
    """Whether some attention layer of a model sees only a window of keys (Mistral, Gemma 2/3 and
    other hybrid local/global models): then one 4D mask cannot be right for every layer."""
    kinds = getattr(config, "layer_types", None) or []
    if any(kind != "full_attention" for kind in kinds):
        return True
    return bool(getattr(config, "sliding_window", None)) and getattr(config, "use_sliding_window", True) \
        and not kinds


def collate(rows: list[dict[str, list[int]]], pad_id: int, mask_dtype: torch.dtype = torch.float32,
            windows: bool = False, pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """Pad rows to one length, the longest row's rounded up to a multiple of `pad_to_multiple_of`
    (as transformers' collators do); returns model(**batch) inputs.

    input_ids, labels (padding -100), position_ids: (B, T), positions restarting at 0 for each
    packed example. Full-attention models get attention_mask (B, 1, T, T), additive: 0 where
    attention is allowed, the dtype's minimum elsewhere. Models with windowed layers
    (``windows=True``, see has_windows) get no mask: transformers then finds the packed examples
    from the restarting position ids and builds each layer's own mask, window included.
    """
    if not rows:
        raise LoraError("collate needs at least one row")
    T = -(-max(len(r["input_ids"]) for r in rows) // pad_to_multiple_of) * pad_to_multiple_of

    def padded(key: str, value: int) -> torch.Tensor:
        return torch.tensor([r[key] + [value] * (T - len(r[key])) for r in rows], dtype=torch.long)

    batch = {"input_ids": padded("input_ids", pad_id), "labels": padded("labels", IGNORE_INDEX),
             "position_ids": padded("position_ids", 0)}  # a pad at position 0 is an example of its own
    if not windows:
        allowed = torch.stack([block_causal_mask(r["seq_lens"], T) for r in rows])[:, None]  # (B, 1, T, T)
        batch["attention_mask"] = torch.zeros(allowed.shape, dtype=mask_dtype).masked_fill_(
            ~allowed, torch.finfo(mask_dtype).min)
    return batch


def count_tokens(rows: list[dict[str, list[int]]]) -> int:
    """Tokens of the examples in rows (pack's or one_per_row's), without the padding collate adds."""
    return sum(len(r["input_ids"]) for r in rows)


def count_answer_tokens(labels: torch.Tensor) -> int:
    """Tokens the causal-LM loss is taken over in a (B, T) label batch (labels[:, 0] never is).

    Sum it over the micro-batches of one optimizer step to normalise the summed loss.
    """
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


def shuffled(rows: list[dict], seed: int = 0, epoch: int = 0) -> list[dict]:
    """The rows in one epoch's order, the same for the same (seed, epoch)."""
    order = list(range(len(rows)))
    random.Random(f"batches:{seed}:{epoch}").shuffle(order)
    return [rows[i] for i in order]


def batches(rows: list[dict], batch_size: int, seed: int = 0, epoch: int = 0) -> Iterator[list[dict]]:
    """Lists of batch_size rows (the last may be shorter), in ``shuffled`` order for (seed, epoch)."""
    if batch_size < 1:
        raise LoraError(f"batch_size must be at least 1, got {batch_size}")
    order = shuffled(rows, seed, epoch)
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


def _tokens_in(row: dict) -> int:
    """A packed row's length, or a preference pair's (data.pairs) longer side."""
    if "input_ids" in row:
        return len(row["input_ids"])
    return max(len(row[side]["input_ids"]) for side in ("chosen", "rejected"))


def length_grouped(rows: list[dict], batch_size: int, seed: int = 0, epoch: int = 0,
                   window: int = 16) -> list[dict]:
    """The epoch's rows in ``shuffled`` order, then within each window of `window`
    batches sorted by length, cut into batches of batch_size and those batches shuffled (the
    last, shorter one stays last): each batch holds rows of similar length, so collate pads
    little. The batch with the epoch's longest row goes first, so the largest activations are
    allocated before smaller ones fragment the heap (and an out-of-memory shows at once); a
    shorter last batch stays last even when it holds that row (moved first, it would shift every
    later batch's rows across the cuts of batch_size).
    transformers' ``group_by_length`` does both, with mega-batches of 50. A pure function of
    (seed, epoch), so a resumed run sees the same order."""
    order = shuffled(rows, seed, epoch)
    rng, grouped, span = random.Random(f"length-groups:{seed}:{epoch}"), [], window * batch_size
    for start in range(0, len(order), span):
        part = sorted(order[start:start + span], key=lambda row: -_tokens_in(row))
        cut = len(part) - len(part) % batch_size
        grouped += rng.sample([part[i:i + batch_size] for i in range(0, cut, batch_size)], cut // batch_size)
        if cut < len(part):
            grouped.append(part[cut:])
    full = [i for i, batch in enumerate(grouped) if len(batch) == batch_size]
    if full:
        widest = max(full, key=lambda i: max(map(_tokens_in, grouped[i])))
        grouped[0], grouped[widest] = grouped[widest], grouped[0]
    return [row for batch in grouped for row in batch]


# ----------------------------------------------------------------------------- splitting


def train_val_split(examples: list, val_fraction: float = 0.05, min_val: int = 2, seed: int = 0,
                    min_rows: int = 20) -> tuple[list, list, str | None]:
    """(train, val, note): hold out a random validation split, keeping the file order.

    With fewer than min_rows examples (or val_fraction 0) nothing is held out and the note
    says why; otherwise the note is None.
    """
    n = len(examples)
    if not 0 <= val_fraction < 1:
        raise LoraError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if val_fraction == 0:
        return list(examples), [], "validation split disabled (val_fraction=0)"
    if n < min_rows:
        return list(examples), [], (f"only {n} example(s): too few to hold out a validation split "
                                    f"(needs {min_rows}); training on all of them, no validation loss")
    n_val = min(max(min_val, round(n * val_fraction)), n // 2)
    held = set(random.Random(f"split:{seed}").sample(range(n), n_val))
    train = [ex for i, ex in enumerate(examples) if i not in held]
    val = [ex for i, ex in enumerate(examples) if i in held]
    return train, val, None
