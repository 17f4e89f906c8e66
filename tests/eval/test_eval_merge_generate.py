"""`loraforge eval`, `merge` and `generate` on a tiny random Llama with a freshly trained adapter:
one subprocess per command (as a user runs it), the rest in-process through `loraforge.cli.main`."""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from cli_helpers import FAST, one_line_error, run_cli
from transformers import AutoModelForCausalLM, AutoTokenizer

from loraforge import data as D
from loraforge.cli import main
from loraforge.eval.score import evaluate
from loraforge.core.io import load_adapter
from loraforge.models import generate_text, load_model, load_tokenizer

PROMPT = "Extract the person as JSON: Maria Lopez is a 34-year-old pilot from Lisbon."


@pytest.fixture(scope="module")
def adapter(base, data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained") / "adapter"
    assert main(["train", "--model", str(base), "--data", str(data["train"]), "--out", str(out),
                 "--max-steps", "15", *FAST]) == 0
    return out


def ids() -> torch.Tensor:
    return torch.randint(3, 400, (2, 10), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def logits_with_adapter(base: Path, adapter: Path | None) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    if adapter is not None:
        load_adapter(model, adapter)
    return model(ids()).logits


# --- eval ----------------------------------------------------------------------------------------
def eval_json(stdout: str) -> dict:
    result = json.loads(stdout.strip().splitlines()[-1])
    assert {"exact_match", "loss", "perplexity", "n"} <= result.keys()
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-3)
    return result


def test_eval_cli_scores_the_adapter_below_the_base_on_its_training_data(base, data, adapter, capsys):
    done = run_cli("eval", "--model", base, "--adapter", adapter, "--data", data["train"], "--limit", 8, "--json")
    assert done.returncode == 0, done.stderr
    tuned = eval_json(done.stdout)
    assert tuned["n"] == 8 and 0 <= tuned["exact_match"] <= 1

    assert main(["eval", "--model", str(base), "--data", str(data["train"]), "--limit", "8", "--json"]) == 0
    stdout = capsys.readouterr().out
    assert f"base model {base}" in stdout
    plain = eval_json(stdout)
    assert tuned["loss"] < plain["loss"] - 0.2, (tuned, plain)

    # without --adapter it is the base model's score
    examples = D.load_examples(data["train"])[:8]
    direct = evaluate(load_model(base, dtype="float32"), load_tokenizer(base), examples)
    assert plain["loss"] == pytest.approx(direct["loss"], abs=1e-4)


def test_eval_of_plain_text_prints_valid_json(base, tmp_path, capsys):
    path = tmp_path / "text.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["Paris is in France.", "The sea is blue."]))
    assert main(["eval", "--model", str(base), "--data", str(path), "--json"]) == 0
    out = capsys.readouterr().out
    assert "exact match n/a" in out
    result = json.loads(out.splitlines()[-1])  # strict JSON: no NaN
    assert result["exact_match"] is None and result["loss"] > 0


def test_eval_of_missing_data_is_one_line(base, tmp_path, capsys):
    assert main(["eval", "--model", str(base), "--data", str(tmp_path / "nope.jsonl")]) == 2
    assert "no such data file" in one_line_error(capsys.readouterr().err)


# --- merge ---------------------------------------------------------------------------------------
@torch.no_grad()
def test_merge_cli_writes_a_plain_transformers_model(base, adapter, tmp_path):
    out = tmp_path / "merged"
    done = run_cli("merge", "--model", base, "--adapter", adapter, "--out", out)
    assert done.returncode == 0, done.stderr
    assert not list(tmp_path.glob(".merged.tmp*"))
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert merged.dtype == torch.float32 and not any("lora" in n for n, _ in merged.named_parameters())
    expected = logits_with_adapter(base, adapter)
    torch.testing.assert_close(merged(ids()).logits, expected, atol=1e-4, rtol=0)
    assert not torch.allclose(expected, logits_with_adapter(base, None), atol=1e-3)
    assert AutoTokenizer.from_pretrained(out).eos_token == "<|im_end|>"


@torch.no_grad()
def test_merge_accepts_an_adapter_saved_by_peft(base, tmp_path, capsys):
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
        theirs = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base), config)
    gen = torch.Generator().manual_seed(3)
    for name, p in theirs.named_parameters():
        if "lora_B" in name:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    theirs.save_pretrained(tmp_path / "peft")
    expected = theirs.eval()(ids()).logits

    assert main(["merge", "--model", str(base), "--adapter", str(tmp_path / "peft"), "--out",
                 str(tmp_path / "merged")]) == 0
    assert f"merged model written to {tmp_path / 'merged'}" in capsys.readouterr().out
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(merged(ids()).logits, expected, atol=1e-4, rtol=0)


def test_merge_refuses_a_non_empty_out_without_force(base, adapter, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["merge", "--model", str(base), "--adapter", str(adapter), "--out", str(out)]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert line == f"loraforge merge: error: output directory {out} is not empty (pass --force to overwrite)"
    assert (out / "keep.txt").read_text() == "mine"

    assert main(["merge", "--model", str(base), "--adapter", str(adapter), "--out", str(out), "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()


# --- generate ------------------------------------------------------------------------------------
def test_generate_cli_prints_only_the_generated_text(base, adapter):
    done = run_cli("generate", "--model", base, "--adapter", adapter, "--prompt", PROMPT, "--max-tokens", 12)
    assert done.returncode == 0, done.stderr
    model, tokenizer = load_model(base, dtype="float32"), load_tokenizer(base)
    load_adapter(model, adapter)
    expected = generate_text(model, tokenizer, [PROMPT], 12)[0]
    assert expected and done.stdout == expected + "\n"


@pytest.mark.parametrize("use_adapter", [False, True])
def test_generate_chat_matches_generate_text(base, adapter, capsys, use_adapter):
    args = ["generate", "--model", str(base), "--prompt", PROMPT, "--max-tokens", "10", "--chat"]
    assert main(args + (["--adapter", str(adapter)] if use_adapter else [])) == 0
    model, tokenizer = load_model(base, dtype="float32"), load_tokenizer(base)
    if use_adapter:
        load_adapter(model, adapter)
    assert capsys.readouterr().out == generate_text(model, tokenizer, [PROMPT], 10, chat=True)[0] + "\n"
