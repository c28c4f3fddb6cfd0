"""A model set: the directory `twostage export --out DIR` writes, DIR/bi-encoder/ and DIR/cross-encoder/."""
from __future__ import annotations

from pathlib import Path

from twostage.model.embedder import Embedder
from twostage.model.reranker import Reranker
from twostage.model.session import SessionSettings


def open_embedder(models_dir: str | Path, settings: SessionSettings = SessionSettings()) -> Embedder:
    """Only the bi-encoder of a model set (e.g. for `twostage index build`), verified against its manifest."""
    return Embedder.open(Path(models_dir) / Embedder.role, settings)


def open_model_set(models_dir: str | Path,
                   settings: SessionSettings = SessionSettings()) -> tuple[Embedder, Reranker]:
    """Both models of a model set, each verified against its manifest."""
    return open_embedder(models_dir, settings), Reranker.open(Path(models_dir) / Reranker.role, settings)
