"""Trainable tokens (PEFT's `trainable_token_indices`): new tokens' rows of the embedding and of
the head train, nothing else does, and the adapter is PEFT's format in both directions."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from safetensors.torch import load_file

from factory import lm_steps, logits, randomize_adapters, tiny_llama, tiny_tokenizer
from loraforge import LoraError
from loraforge.core.config import LoraConfig
from loraforge.core.io import WEIGHTS_NAME, load_adapter, read_adapter, save_adapter
from loraforge.core.ops import adapter_params, attach, merge_and_unload
from loraforge.core.tokens import KEY, TrainableTokens, grow_vocabulary, parse_new_tokens

peft = pytest.importorskip("peft")

NEW = ["<|tool|>", "<|end_tool|>"]
EMBED, HEAD = "base_model.model.model.embed_tokens." + KEY, "base_model.model.lm_head." + KEY


def grown_tokenizer():
    tok = copy.deepcopy(tiny_tokenizer())
    tok.add_tokens(parse_new_tokens(",".join(NEW), tok), special_tokens=True)
    return tok


def new_ids(tok) -> list[int]:
    return tok.convert_tokens_to_ids(NEW)


def indices(tok, tied: bool):
    """PEFT's forms: a list for the embedding (a tied head follows it), a dict naming the head too."""
    ids = new_ids(tok)
    return ids if tied else {"embed_tokens": ids, "lm_head": ids}


def sample_ids(tok) -> torch.Tensor:
    text = "<|im_start|>user\nCall the tool.<|im_end|>\n<|tool|>Paris<|end_tool|> is the capital of France."
    return torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])


def ours(tok, tied: bool, seed: int = 3):
    """Our model: base grown to the tokenizer, LoRA on q/v, trainable tokens, all randomised."""
    model = tiny_llama(text=True, tied=tied)
    grow_vocabulary(model, new_ids(tok))
    attach(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"],
                             trainable_token_indices=indices(tok, tied)))
    randomize_adapters(model, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in adapter_params(model).items():
            if "trainable_tokens_delta" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
    return model.eval()


def peft_base(tok, tied: bool):
    base = tiny_llama(text=True, tied=tied)
    base.resize_token_embeddings(len(tok))  # what a PEFT user does before get_peft_model
    return base


def peft_copy(model, tok, tied: bool, path, **kwargs):
    """Our adapter saved to `path` and loaded by PEFT onto a grown base."""
    save_adapter(model, path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(peft_base(tok, tied), path, **kwargs)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_peft_loads_our_adapter_with_equal_logits(tmp_path, tied):
    tok = grown_tokenizer()
    model = ours(tok, tied)
    theirs = peft_copy(model, tok, tied, tmp_path).eval()
    ids = sample_ids(tok)
    assert set(new_ids(tok)) <= set(ids[0].tolist())
    assert torch.equal(logits(theirs, ids), logits(model, ids))


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_we_load_peft_adapter_with_equal_logits(tmp_path, tied):
    tok = grown_tokenizer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(peft_base(tok, tied), peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], trainable_token_indices=indices(tok, tied)))
    randomize_adapters(theirs, seed=5)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "trainable_tokens_delta" in name:
                p.add_(torch.randn_like(p))
    theirs.save_pretrained(tmp_path, save_embedding_layers=False)
    model = tiny_llama(text=True, tied=tied)
    grow_vocabulary(model, new_ids(tok))
    load_adapter(model, tmp_path)
    ids = sample_ids(tok)
    assert torch.equal(logits(model, ids), logits(theirs.eval(), ids))


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_only_the_new_rows_are_stored(tmp_path, tied):
    tok = grown_tokenizer()
    save_adapter(ours(tok, tied), tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    rows = {k: tuple(v.shape) for k, v in tensors.items() if KEY in k}
    assert rows == ({EMBED: (2, 64)} if tied else {EMBED: (2, 64), HEAD: (2, 64)})
    config, _ = read_adapter(tmp_path)
    assert config.trainable_token_indices == indices(tok, tied)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_training_changes_only_the_new_rows_of_embedding_and_head(tied):
    tok = grown_tokenizer()
    model = tiny_llama(text=True, tied=tied)
    grow_vocabulary(model, new_ids(tok))
    before_embed = model.get_input_embeddings().weight.detach().clone()
    before_head = model.get_output_embeddings().weight.detach().clone()
    attach(model, LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=indices(tok, tied)))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sum("trainable_tokens_delta" in n for n in trainable) == (1 if tied else 2)
    lm_steps(model, sample_ids(tok), steps=3, lr=0.05)
    merged = merge_and_unload(model)
    assert not any(isinstance(m, TrainableTokens) for m in merged.modules())
    embed, head = merged.get_input_embeddings().weight, merged.get_output_embeddings().weight
    new = new_ids(tok)
    old = [i for i in range(len(tok)) if i not in new]
    assert torch.equal(embed[old], before_embed[old]) and torch.equal(head[old], before_head[old])
    assert not torch.equal(embed[new], before_embed[new]) and not torch.equal(head[new], before_head[new])
    assert (embed is head) == tied


def test_merged_model_computes_the_adapter():
    tok = grown_tokenizer()
    model = ours(tok, tied=False)
    ids = sample_ids(tok)
    expected = logits(model, ids)
    torch.testing.assert_close(logits(merge_and_unload(model), ids), expected, atol=1e-5, rtol=0)  # LoRA's merge rounds


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_the_rows_gradient_is_peft_s(tmp_path, tied):
    tok = grown_tokenizer()
    model = ours(tok, tied)
    theirs = peft_copy(model, tok, tied, tmp_path, is_trainable=True)
    ids = sample_ids(tok)
    for m in (model, theirs):
        m(input_ids=ids, labels=ids).loss.backward()
    grads = {n.replace(".default", ""): p.grad for n, p in theirs.named_parameters() if "tokens_delta" in n}
    ours_grads = {"base_model.model." + n.replace("trainable_tokens_delta.default", KEY): p.grad
                  for n, p in model.named_parameters() if "tokens_delta" in n}
    assert grads.keys() == ours_grads.keys() and len(grads) == (1 if tied else 2)
    for key in grads:
        torch.testing.assert_close(ours_grads[key], grads[key], atol=1e-6, rtol=1e-5, msg=key)


@pytest.mark.parametrize("text, message", [
    ("<|tool|>,", "token 2 is empty"),
    ("", "token 1 is empty"),
    ("<|tool|>,<|tool|>", "'<|tool|>' is given twice"),
    ("<|im_end|>", "'<|im_end|>' is already in the tokenizer's vocabulary (id 2)"),
])
def test_bad_new_tokens_are_one_line_errors(text, message):
    with pytest.raises(LoraError) as err:
        parse_new_tokens(text, tiny_tokenizer())
    assert message in str(err.value) and "\n" not in str(err.value)


def test_an_adapter_with_new_tokens_on_a_base_without_them_is_refused(tmp_path):
    tok = grown_tokenizer()
    save_adapter(ours(tok, tied=True), tmp_path)
    base = tiny_llama(text=True, tied=True)
    with pytest.raises(LoraError, match=r"trains token ids up to 513, but this model's vocabulary has 512 rows.*"
                                        r"loraforge merge"):
        load_adapter(base, tmp_path)
    assert not any(isinstance(m, TrainableTokens) for m in base.modules())  # left untouched


def test_bad_trainable_token_configs_are_one_line_errors():
    model = tiny_llama(text=True)
    with pytest.raises(LoraError, match="trainable_token_indices must be a list of token ids"):
        LoraConfig(trainable_token_indices=["<|tool|>"])
    with pytest.raises(LoraError, match=r"ids must be in \[0, 512\), got \[600\]"):
        attach(model, LoraConfig(target_modules=["q_proj"], trainable_token_indices=[600]))
    with pytest.raises(LoraError, match="embed_tokens is a LoRA target and has trainable tokens"):
        attach(model, LoraConfig(target_modules=["embed_tokens"], trainable_token_indices=[5]))
    with pytest.raises(LoraError, match="names 'nowhere', which matches no modules"):
        attach(model, LoraConfig(target_modules=["q_proj"], trainable_token_indices={"nowhere": [5]}))
    assert not hasattr(model, "lora_configs")


@pytest.mark.parametrize("tied", [True, False])
def test_a_second_adapter_with_new_tokens_attaches_and_switches(tied):
    """Two adapters each with their own rows for the new tokens: each gives its own logits."""
    from loraforge.core.ops import set_adapter

    tok = grown_tokenizer()
    model = ours(tok, tied, seed=3)
    ids = sample_ids(tok)
    with torch.no_grad():
        first = model(ids).logits
    attach(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"],
                             trainable_token_indices=indices(tok, tied)), "second")
    with torch.no_grad():
        for name, p in adapter_params(model).items():
            if "trainable_tokens_delta.second" in name:
                p.add_(1.0)
        set_adapter(model, "second")
        second = model(ids).logits
        set_adapter(model, "default")
        again = model(ids).logits
    assert torch.equal(first, again) and not torch.allclose(first, second)
