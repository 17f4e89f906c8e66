"""loraforge.data: formats, line-numbered errors, label masks, truncation, packing, batching.

The key test is test_packed_equals_unpacked: a packed row must give every token the same
logits and loss as running its example alone, on a real (tiny, random) LlamaForCausalLM.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
import factory
from factory import tiny_tokenizer

from loraforge import LoraError
from loraforge.data import (
    IGNORE_INDEX, Example, answer_text, batches, block_causal_mask, collate, count_answer_tokens,
    detect_format, encode_example, encode_examples, length_grouped, load_examples, one_per_row, pack, parse_record,
    prompt_text, read_jsonl, train_val_split,
)

CHAT = {"messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "Convert 2021-03-04."},
                     {"role": "assistant", "content": "4 March 2021"}]}
ALPACA = {"instruction": "Extract the person as JSON.", "input": "Maria Lopez is a 34-year-old pilot.",
          "output": '{"name": "Maria Lopez", "age": 34}'}
COMPLETION = {"prompt": "The capital of France is", "completion": " Paris."}
TEXT = {"text": "The quick brown fox jumps over the lazy dog."}


def write(path, rows) -> str:
    """Write rows (dicts, or raw strings for broken lines) as JSONL; return the path as str."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def example(prompt: str = "Convert 2021-03-04.", answer: str = "4 March 2021") -> Example:
    return parse_record({"messages": [{"role": "user", "content": prompt},
                                      {"role": "assistant", "content": answer}]})


def decode_labels(tok, labels) -> str:
    return tok.decode([t for t in labels if t != IGNORE_INDEX])


# ----------------------------------------------------------------------------- formats


def test_every_format_parses(tmp_path):
    chat = load_examples(write(tmp_path / "c.jsonl", [CHAT, CHAT]))
    assert [m["role"] for m in chat[0].messages] == ["system", "user"]
    assert chat[0].answer == "4 March 2021" and chat[0].fmt == "chat" and chat[1].where.endswith("line 2")

    alpaca = load_examples(write(tmp_path / "a.jsonl", [ALPACA, {"instruction": "Say hi.", "output": "hi"}]))
    assert alpaca[0].messages == [{"role": "user", "content": ALPACA["instruction"] + "\n\n" + ALPACA["input"]}]
    assert alpaca[0].answer == ALPACA["output"] and alpaca[1].messages[0]["content"] == "Say hi."

    comp = load_examples(write(tmp_path / "p.jsonl", [COMPLETION]))[0]
    assert (comp.messages[0]["content"], comp.answer, comp.fmt) == (COMPLETION["prompt"], " Paris.", "completion")

    text = load_examples(write(tmp_path / "t.jsonl", ["", TEXT, "   "]))[0]  # blank lines skipped
    assert (text.messages, text.answer, text.text, text.where) == ([], None, TEXT["text"], f"{tmp_path}/t.jsonl line 2")
    assert [detect_format(r) for r in (CHAT, ALPACA, COMPLETION, TEXT, {"x": 1})] == \
        ["chat", "alpaca", "completion", "text", None]
    assert read_jsonl(write(tmp_path / "r.jsonl", [TEXT, ALPACA])) == [TEXT, ALPACA]


def msgs(*pairs) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in pairs]}


BAD_ROWS = [  # (line 3 content, expected message fragment)
    ('{"text": "a",}', "not valid JSON"),
    ('[1, 2]', "expected a JSON object, got a list"),
    ({"question": "q", "answer": "a"}, "no recognised format (keys: answer, question)"),
    ({"messages": "hi"}, "'messages' must be a non-empty list"),
    ({"messages": []}, "'messages' must be a non-empty list"),
    ({"messages": ["hi"]}, "messages[0] must be an object"),
    (msgs(("user", "q"), ("bot", "a")), "messages[1] has role 'bot'"),
    ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]},
     "messages[0] 'content' must be a string, got a number"),
    (msgs(("user", "q")), "last message must be the assistant's answer, got role 'user'"),
    (msgs(("system", "s"), ("assistant", "a")), "no user message"),
    ({"instruction": "q", "output": 3}, "'output' must be a string, got a number"),
    ({"instruction": "q"}, "missing 'output'"),
    ({"instruction": "q", "input": ["x"], "output": "a"}, "'input' must be a string, got a list"),
    ({"prompt": "q"}, "missing 'completion'"),
    ({"text": None}, "'text' must be a string, got null"),
    ({"text": "  "}, "'text' is empty"),
    (COMPLETION, "row is in completion format but"),  # other lines are chat
]


@pytest.mark.parametrize("bad,fragment", BAD_ROWS)
def test_bad_row_names_file_and_line(tmp_path, bad, fragment):
    path = write(tmp_path / "data.jsonl", [CHAT, "", bad, CHAT])
    with pytest.raises(LoraError) as err:
        load_examples(path)
    message = str(err.value)
    assert message.startswith(f"{path} line 3: ") and fragment in message and "\n" not in message


def test_file_level_errors(tmp_path):
    with pytest.raises(LoraError, match="no such data file"):
        load_examples(tmp_path / "missing.jsonl")
    with pytest.raises(LoraError, match="empty.jsonl has no examples"):
        load_examples(write(tmp_path / "empty.jsonl", ["", "  "]))
    with pytest.raises(LoraError, match="not a file"):
        read_jsonl(tmp_path)
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(LoraError, match="not UTF-8"):
        read_jsonl(tmp_path / "latin1.jsonl")


# ----------------------------------------------------------------------------- encoding


def test_labels_mask_the_prompt():
    tok = tiny_tokenizer()
    ex = example()
    ids, labels = encode_example(ex, tok)
    prompt = prompt_text(ex, tok)
    full = tok.apply_chat_template(ex.messages + [{"role": "assistant", "content": ex.answer}], tokenize=False)
    assert prompt.endswith("<|im_start|>assistant\n")
    assert tok.decode(ids) == full.rstrip("\n")  # the answer ends with the template's own <|im_end|>
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:] and ids[-1] == tok.convert_tokens_to_ids("<|im_end|>")
    assert decode_labels(tok, labels) == "4 March 2021<|im_end|>"


def test_train_on_prompt_unmasks():
    ids, labels = encode_example(example(), tiny_tokenizer(), train_on_prompt=True)
    assert labels == ids


def test_plain_text_labels_are_inputs():
    tok = tiny_tokenizer()
    ids, labels = encode_example(parse_record(TEXT), tok)
    assert labels == ids and ids[-1] == tok.eos_token_id and tok.decode(ids[:-1]) == TEXT["text"]
    with pytest.raises(LoraError, match="plain-text example has no prompt"):
        prompt_text(parse_record(TEXT), tok)


def test_end_of_turn_marker_comes_from_any_template():
    tok = copy.deepcopy(tiny_tokenizer())
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
                         "{% else %}{{ m['content'] }}</s>{% endif %}{% endfor %}")
    ex = example()
    assert prompt_text(ex, tok) == "[INST] Convert 2021-03-04. [/INST]"
    assert answer_text(ex, tok) == "4 March 2021</s>"


def test_without_chat_template_prompt_answer_eos():
    tok = copy.deepcopy(tiny_tokenizer())
    tok.chat_template = None
    comp = parse_record(COMPLETION)
    ids, labels = encode_example(comp, tok)
    assert tok.decode(ids) == "The capital of France is Paris.<|im_end|>"
    assert decode_labels(tok, labels) == " Paris.<|im_end|>"
    assert prompt_text(example(), tok) == "Convert 2021-03-04.\n\n"
    # chat_template=False does the same on a tokenizer that has one
    assert encode_example(comp, tiny_tokenizer(), chat_template=False) == (ids, labels)


def test_truncation_keeps_or_drops_and_reports():
    tok = tiny_tokenizer()
    ex = example(answer="4 March 2021, which was a Thursday in the spring of that year")
    ids, labels = encode_example(ex, tok)
    n_prompt = labels.count(IGNORE_INDEX)
    fits = len(encode_example(example(), tok)[0])  # same prompt, short answer
    assert n_prompt + 1 < fits < len(ids)
    enc = encode_examples([ex, example()], tok, max_len=fits)
    assert len(enc.pairs) == 2 and enc.truncated == 1 and enc.dropped == 0
    assert enc.pairs[0] == (ids[:fits], labels[:fits])
    enc = encode_examples([ex, example("x " * 200)], tok, max_len=fits)
    assert len(enc.pairs) == 1 and enc.dropped == 1 and "dropped 1" in enc.note()
    assert encode_examples([ex], tok).note() is None
    with pytest.raises(LoraError, match="no example keeps an answer token"):
        encode_examples([ex], tok, max_len=n_prompt)


# ----------------------------------------------------------------------------- packing


def encoded_set(n: int = 7) -> list:
    from loraforge.demo.tasks import make_examples
    rows = make_examples(n, seed=5, task="dates") + [TEXT]
    return encode_examples([parse_record(r) for r in rows], tiny_tokenizer()).pairs


def test_pack_rows_hold_every_example_once():
    pairs = encoded_set()
    longest = max(len(ids) for ids, _ in pairs)
    rows = pack(pairs, max_tokens=2 * longest + 5)
    assert len(rows) < len(pairs)
    seen = []
    for row in rows:
        assert len(row["input_ids"]) == len(row["labels"]) == len(row["position_ids"]) == sum(row["seq_lens"])
        assert len(row["input_ids"]) <= 2 * longest + 5
        start = 0
        for n in row["seq_lens"]:
            assert row["position_ids"][start:start + n] == list(range(n))
            assert row["labels"][start] == IGNORE_INDEX  # never predicted across examples
            seen.append(tuple(row["input_ids"][start:start + n]))
            start += n
    assert sorted(seen) == sorted(tuple(ids) for ids, _ in pairs)
    assert [r["seq_lens"] for r in one_per_row(pairs)] == [[len(ids)] for ids, _ in pairs]
    with pytest.raises(LoraError, match="more than max_tokens"):
        pack(pairs, max_tokens=longest - 1)


def test_block_causal_mask_and_collate_padding():
    allowed = block_causal_mask([2, 3], 7)
    expected = torch.tensor([[1, 0, 0, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0, 0, 0],
                             [0, 0, 1, 0, 0, 0, 0],
                             [0, 0, 1, 1, 0, 0, 0],
                             [0, 0, 1, 1, 1, 0, 0],
                             [0, 0, 0, 0, 0, 1, 0],  # padding sees only itself
                             [0, 0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(allowed, expected)
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "position_ids": [0, 1, 2], "seq_lens": [3]},
            {"input_ids": [8, 9], "labels": [-100, 9], "position_ids": [0, 1], "seq_lens": [2]}]
    batch = collate(rows, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, 9, -100]]
    assert batch["attention_mask"].shape == (2, 1, 3, 3) and batch["attention_mask"].dtype == torch.float32
    assert batch["attention_mask"][1, 0, 2].tolist() == [torch.finfo(torch.float32).min] * 2 + [0.0]
    assert count_answer_tokens(batch["labels"]) == 3
    assert collate(rows, 0, mask_dtype=torch.bfloat16)["attention_mask"].dtype == torch.bfloat16
    wide = collate(rows, pad_id=0, pad_to_multiple_of=4)  # width 3 rounded up to 4; 1 leaves it
    assert wide["input_ids"].tolist() == [[5, 6, 7, 0], [8, 9, 0, 0]] and wide["attention_mask"].shape == (2, 1, 4, 4)
    assert count_answer_tokens(wide["labels"]) == 3 and wide["position_ids"][:, :3].tolist() == [[0, 1, 2], [0, 1, 0]]
    assert collate(rows, 0, pad_to_multiple_of=1)["input_ids"].shape == (2, 3)


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def tiny_llama(request):
    return factory.tiny_llama(context=256, attn=request.param, text=True)


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(T,) loss of predicting labels[t] from position t-1; 0 where ignored (t = 0 included)."""
    loss = F.cross_entropy(logits[:-1], labels[1:], ignore_index=IGNORE_INDEX, reduction="none")
    return torch.cat([torch.zeros(1), loss])


@torch.no_grad()
def test_packed_equals_unpacked(tiny_llama):
    pairs = encoded_set(7)
    rows = pack(pairs, max_tokens=3 * max(len(ids) for ids, _ in pairs))
    assert len(rows) >= 2 and max(len(r["seq_lens"]) for r in rows) >= 3  # real packing and padding
    batch = collate(rows, pad_id=tiny_tokenizer().pad_token_id)
    out = tiny_llama(**batch)
    # alone: each example, no mask, no position ids
    alone = {tuple(ids): (tiny_llama(torch.tensor([ids])).logits[0], torch.tensor(labels)) for ids, labels in pairs}
    total, n_tokens = 0.0, 0
    for b, row in enumerate(rows):
        start = 0
        for n in row["seq_lens"]:
            ref_logits, ref_labels = alone[tuple(row["input_ids"][start:start + n])]
            packed_logits = out.logits[b, start:start + n]  # (n, vocab)
            torch.testing.assert_close(packed_logits, ref_logits, atol=2e-5, rtol=1e-4)
            packed_labels = batch["labels"][b, start:start + n]
            torch.testing.assert_close(token_losses(packed_logits, packed_labels), token_losses(ref_logits, ref_labels))
            total += token_losses(ref_logits, ref_labels).sum().item()
            n_tokens += int((ref_labels[1:] != IGNORE_INDEX).sum())
            start += n
    # the model's own loss over the packed batch is the mean over exactly the answer tokens
    assert count_answer_tokens(batch["labels"]) == n_tokens
    assert out.loss.item() == pytest.approx(total / n_tokens, rel=1e-5)


def test_two_line_file_trains(tmp_path, tiny_llama):
    path = write(tmp_path / "tiny.jsonl", [ALPACA, ALPACA | {"input": ""}])
    train, val, note = train_val_split(load_examples(path))
    assert len(train) == 2 and val == [] and "too few" in note
    rows = pack(encode_examples(train, tiny_tokenizer()).pairs, max_tokens=256)
    batch = collate(rows, tiny_tokenizer().pad_token_id)
    tiny_llama.zero_grad()
    tiny_llama(**batch).loss.backward()
    grad = tiny_llama.model.embed_tokens.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    tiny_llama.zero_grad()


# ----------------------------------------------------------------------------- batching, splitting


def test_batches_are_deterministic_per_seed_and_epoch():
    rows = [{"i": i} for i in range(10)]

    def order(seed, epoch):
        return [[r["i"] for r in b] for b in batches(rows, 4, seed=seed, epoch=epoch)]

    assert order(0, 0) == order(0, 0)
    assert [len(b) for b in order(0, 0)] == [4, 4, 2]
    assert sorted(sum(order(0, 0), [])) == list(range(10))
    assert order(0, 1) != order(0, 0) and order(1, 0) != order(0, 0)
    with pytest.raises(LoraError):
        next(batches(rows, 0))


def test_length_grouped_keeps_a_shorter_last_batch_last():
    """65 rows in batches of 4: the last batch has one row. When that row is the epoch's longest,
    moving its batch first would shift every later batch across the cuts of 4; it stays last, so
    every cut of 4 holds one sorted batch, in every epoch."""
    import random

    gen = random.Random(1)
    rows = [{"input_ids": [1] * n} for n in gen.sample(range(10, 400), 65)]  # distinct lengths
    moved = 0
    for epoch in range(300):
        order = [len(r["input_ids"]) for r in length_grouped(rows, 4, seed=0, epoch=epoch)]
        cuts = [order[i:i + 4] for i in range(0, 64, 4)]
        assert all(cut == sorted(cut, reverse=True) for cut in cuts), epoch
        moved += order[-1] == max(order)
        assert max(cuts[0]) == max(map(max, cuts))  # the widest full batch first
    assert moved > 0  # the case happened


def test_length_grouped_batches_rows_of_similar_length_in_shuffled_order():
    import random

    gen = random.Random(0)
    rows = [{"input_ids": [1] * gen.randint(10, 250), "i": i} for i in range(203)]
    grouped = length_grouped(rows, 4, seed=0, epoch=0, window=8)
    assert sorted(r["i"] for r in grouped) == list(range(203))  # every row once
    assert grouped == length_grouped(rows, 4, seed=0, epoch=0, window=8)  # a pure function of (seed, epoch)
    assert grouped != length_grouped(rows, 4, seed=0, epoch=1, window=8)

    def padding(order):
        return sum(4 * max(len(r["input_ids"]) for r in order[i:i + 4]) - sum(len(r["input_ids"]) for r in order[i:i + 4])
                   for i in range(0, 200, 4))

    shuffled = [r for b in batches(rows, len(rows), seed=0, epoch=0) for r in b]
    assert padding(grouped) < 0.2 * padding(shuffled)
    longest = max(len(r["input_ids"]) for r in rows)
    assert longest in [len(r["input_ids"]) for r in grouped[:4]]  # the widest batch first
    # windows of 8 batches: each sorted, then its batches shuffled (only the widest batch moved out)
    for w in range(1, 6):
        window = {r["i"] for r in shuffled[w * 32:(w + 1) * 32]}
        assert len(window & {r["i"] for r in grouped[w * 32:(w + 1) * 32]}) >= 28
    lengths = [len(r["input_ids"]) for r in grouped[32:64]]
    assert lengths != sorted(lengths, reverse=True)  # the window's batches are not in length order
    pairs = [{"chosen": {"input_ids": [1] * n}, "rejected": {"input_ids": [1] * (300 - n)}} for n in range(5, 300, 7)]
    assert sorted(map(id, length_grouped(pairs, 2))) == sorted(map(id, pairs))  # preference pairs: their longer side


def test_train_val_split():
    items = list(range(100))
    train, val, note = train_val_split(items, val_fraction=0.05, seed=3)
    assert note is None and len(val) == 5 and len(train) == 95
    assert sorted(train + val) == items and train == sorted(train)  # file order kept
    assert train_val_split(items, seed=3)[1] == val and train_val_split(items, seed=4)[1] != val
    assert len(train_val_split(list(range(20)), val_fraction=0.05, min_val=2)[1]) == 2
    train, val, note = train_val_split(list(range(19)))
    assert len(train) == 19 and val == [] and "only 19 example(s)" in note
    assert train_val_split(items, val_fraction=0)[2].startswith("validation split disabled")
    with pytest.raises(LoraError, match="val_fraction"):
        train_val_split(items, val_fraction=1.5)
