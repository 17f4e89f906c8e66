"""`loraforge train --add-tokens`: the tokenizer grows, only the new rows of the embedding and
head train, the adapter is PEFT's trainable-tokens format, and merge / serve handle it."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from cli_helpers import FAST, adapter_tensors, assert_same_adapter, kill_at_first_checkpoint, one_line_error
from factory import save_tiny_llama
from transformers import AutoModelForCausalLM, AutoTokenizer

from loraforge import LoraError
from loraforge.cli import main
from loraforge.core.io import CONFIG_NAME, load_adapter
from loraforge.core.tokens import KEY
from loraforge.serve.adapters import peek_config
from loraforge.train.config import resolve

NEW = "<|tool|>,<|end_tool|>"
STEPS = 30


def write_tool_chats(path: Path, n: int = 40) -> Path:
    cities = ["Paris", "Oslo", "Rome", "Lima", "Cairo"]
    rows = [{"messages": [{"role": "user", "content": f"Look up the weather in {cities[i % 5]}."},
                          {"role": "assistant", "content": f"<|tool|>weather {cities[i % 5]}<|end_tool|>"}]}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def chats(tmp_path_factory) -> Path:
    return write_tool_chats(tmp_path_factory.mktemp("tools") / "tools.jsonl")


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def base_and_run(request, chats, tmp_path_factory):
    base = save_tiny_llama(tmp_path_factory.mktemp("base"), tied=request.param)
    out = tmp_path_factory.mktemp("run") / "adapter"
    assert main(args(base, chats, out, "--max-steps", 8)) == 0
    return base, out, request.param


def args(base, data, out, *extra) -> list[str]:
    return ["train", "--model", str(base), "--data", str(data), "--out", str(out), "--add-tokens", NEW,
            "--targets", "q_proj,v_proj", *FAST, "--lr", "0.05", *map(str, extra)]


def test_the_adapter_stores_two_rows_and_the_tokenizer_has_the_tokens(base_and_run):
    _, out, tied = base_and_run
    rows = {k: tuple(v.shape) for k, v in adapter_tensors(out).items() if KEY in k}
    embed, head = f"base_model.model.model.embed_tokens.{KEY}", f"base_model.model.lm_head.{KEY}"
    assert rows == ({embed: (2, 64)} if tied else {embed: (2, 64), head: (2, 64)})
    config = json.loads((out / CONFIG_NAME).read_text())
    assert config["trainable_token_indices"] == ([512, 513] if tied else {"embed_tokens": [512, 513],
                                                                          "lm_head": [512, 513]})
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.convert_tokens_to_ids(["<|tool|>", "<|end_tool|>"]) == [512, 513]
    assert tok("<|tool|>x<|end_tool|>", add_special_tokens=False)["input_ids"][0] == 512


def test_merge_writes_the_grown_vocabulary_with_only_the_new_rows_trained(base_and_run, tmp_path):
    base, out, tied = base_and_run
    assert main(["merge", "--model", str(base), "--adapter", str(out), "--out", str(tmp_path / "m")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    original = AutoModelForCausalLM.from_pretrained(base)
    stored = adapter_tensors(out)
    for kind in ("input", "output"):
        new = getattr(merged, f"get_{kind}_embeddings")().weight
        old = getattr(original, f"get_{kind}_embeddings")().weight
        assert new.shape == (514, 64)
        assert torch.equal(new[:512], old)  # the old rows, bit for bit
        owner = "model.embed_tokens" if kind == "input" or tied else "lm_head"
        assert torch.equal(new[512:], stored[f"base_model.model.{owner}.{KEY}"])
    assert AutoTokenizer.from_pretrained(tmp_path / "m").convert_tokens_to_ids("<|end_tool|>") == 513


def test_peft_loads_the_trained_adapter_with_our_logits(base_and_run):
    peft = pytest.importorskip("peft")
    base, out, _ = base_and_run
    tok = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([tok("<|tool|>weather Oslo<|end_tool|>", add_special_tokens=False)["input_ids"]])
    ours = AutoModelForCausalLM.from_pretrained(base)
    ours.resize_token_embeddings(len(tok))
    theirs = AutoModelForCausalLM.from_pretrained(base)
    theirs.resize_token_embeddings(len(tok))
    load_adapter(ours, out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(theirs, out)
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)


def test_serve_refuses_it_unmerged_in_one_line(base_and_run):
    _, out, _ = base_and_run
    with pytest.raises(LoraError, match=r"trainable tokens \(--add-tokens\).*merge it first \(loraforge merge\)"):
        peek_config(out)


def test_the_base_without_the_tokens_is_refused_in_one_line(base_and_run):
    base, out, _ = base_and_run
    with pytest.raises(LoraError, match="vocabulary has 512 rows: resize its embeddings"):
        load_adapter(AutoModelForCausalLM.from_pretrained(base), out)


def test_kill_9_then_resume_gives_the_uninterrupted_adapter(chats, tmp_path):
    base = save_tiny_llama(tmp_path / "base", tied=False)
    reference, out = tmp_path / "reference", tmp_path / "run"
    assert main(args(base, chats, reference, "--max-steps", STEPS)) == 0
    stopped_at = kill_at_first_checkpoint(args(base, chats, out, "--max-steps", STEPS, "--save-every", 2), out)
    assert 2 <= stopped_at < STEPS
    assert main(args(base, chats, out, "--max-steps", STEPS, "--save-every", 2, "--resume")) == 0
    assert_same_adapter(reference, out)


def test_a_recipe_sets_add_tokens(tmp_path):
    recipe = tmp_path / "tools.yaml"
    recipe.write_text("add_tokens: '<|tool|>,<|end_tool|>'\nmax_steps: 3\n")
    assert resolve(str(recipe)).add_tokens == NEW


@pytest.mark.parametrize("extra, message", [
    (["--add-tokens", "<|tool|>,,<|x|>"], "--add-tokens '<|tool|>,,<|x|>': token 2 is empty"),
    (["--add-tokens", "<|im_end|>"], "'<|im_end|>' is already in the tokenizer's vocabulary (id 2)"),
    (["--add-tokens", "<|tool|>", "--quantize", "nf4"], "add_tokens trains embedding rows, which a quantized base"),
])
def test_bad_inputs_are_one_line_errors(chats, base, tmp_path, capsys, extra, message):
    argv = ["train", "--model", str(base), "--data", str(chats), "--out", str(tmp_path / "o"), *FAST, *extra]
    assert main(argv) == 2
    assert message in one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "o").exists()
