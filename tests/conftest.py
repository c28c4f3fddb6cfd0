"""Shared fixtures. Tests never reach the Hugging Face hub."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model set made by the export pipeline from tiny random BERT models: DIR/bi-encoder/ (mean pooling,
    normalized, 32 dimensions) and DIR/cross-encoder/ (one logit). Built once per test session."""
    from tiny_models import make_tiny_model_set

    return make_tiny_model_set(tmp_path_factory.mktemp("tiny-model-set"))
