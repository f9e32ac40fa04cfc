"""Shared fixtures: offline hub, a private TUNELAB_HOME, the bundled tokenizer, tiny models."""

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TUNELAB_HOME", str(Path(__file__).resolve().parents[1] / ".tunelab-home"))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    from tunelab.models import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture()
def tiny_llama(tokenizer):
    from tunelab.models import tiny_model

    return tiny_model("llama", tokenizer=tokenizer)
