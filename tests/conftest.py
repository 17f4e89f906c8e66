"""Shared fixtures over the one model factory (factory.py): tiny random models built in code.

`llama()` / `gpt2()` give a fresh, seeded model in eval mode; building the same one twice gives
identical weights, so a "fresh base" for a round trip is just another call.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from cli_helpers import write_data
from factory import VOCAB, save_tiny_llama, tiny_gpt2, tiny_llama
from transformers.utils import logging as hf_logging

hf_logging.set_verbosity_error()
warnings.filterwarnings("ignore", category=FutureWarning)
torch.set_num_threads(1)


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def gpt2():
    return tiny_gpt2()


@pytest.fixture
def ids():
    return torch.randint(0, VOCAB, (3, 7), generator=torch.Generator().manual_seed(5))


# Saved tiny model directory and demo-task data, for the CLI tests (one per test module).
@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    return write_data(tmp_path_factory.mktemp("data"))
