"""The public API: the names `loraforge` re-exports, and the README's library example run as written
(on the tiny test model in place of the embedded one)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from factory import tiny_llama, tiny_tokenizer

import loraforge

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_issue_import_line_works():
    from loraforge import LoraConfig, attach, load_adapter, merge_and_unload, save_adapter  # noqa: F401


@pytest.mark.parametrize("name", loraforge.__all__)
def test_every_exported_name_resolves(name):
    assert getattr(loraforge, name) is not None


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'no_such_thing'"):
        loraforge.no_such_thing  # noqa: B018


def test_the_readme_library_example_runs(tmp_path, monkeypatch):
    code = re.search(r"## Library\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(loraforge, "load_model", lambda: tiny_llama(text=True))
    monkeypatch.setattr(loraforge, "load_tokenizer", tiny_tokenizer)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # the README's own text, run as a user would
    assert (tmp_path / "my-adapter" / "adapter_model.safetensors").is_file()
    assert isinstance(scope["merged"], torch.nn.Module) and not hasattr(scope["merged"], "lora_configs")
    assert scope["mixed_logits"].shape == scope["base_logits"].shape
