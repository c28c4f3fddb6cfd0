"""Record tests/data/serving_fixture.json: what the serving path returns for fixed texts on the tiny model set
(tests/tiny_models.py), so that tests/test_serving_fixture.py can check that a restructuring of that path keeps
every vector and score bit for bit.

The recorded file was made with the code of commit 3597c0f (before the model layer existed), through that
commit's `Engine`, by running this script with that commit installed:

    git worktree add /tmp/old 3597c0f && (cd /tmp/old && python -m venv .venv && .venv/bin/pip install -e '.[export,dev]')
    /tmp/old/.venv/bin/python tests/data/record_serving_fixture.py   # from this checkout

It uses only the old interfaces (`app.load_engine`, `engine.embed_batcher`, `engine._embed_texts`); it does not
run against the current tree. The cases (inputs and knobs) are in CASES below and are written into the fixture,
so the test reads them from there.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import platform
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/, for tiny_models

LONG = ("the river water is cold at night and the sea is dark when the moon is not in the sky so a bird on a "
        "tree by the road sleeps until the sun comes up over the mountain and the city wakes to rain ")
CASES = {
    "embed": [
        {"name": "texts", "texts": ["the cat", "how do bees make honey from flower nectar",
                                    "why is the sea salt water", LONG * 3, "a", "python git branch commit error"],
         "truncate": True, "max_tokens": 0},
        {"name": "query capped at 8 tokens", "texts": ["what is the best road to the city by train at night"],
         "truncate": True, "max_tokens": 8},
    ],
    "rerank": [
        {"name": "normalized", "query": "why is the river water cold at night",
         "docs": ["the river water is cold at night", "a cat sleeps", LONG * 2, "coffee and tea with milk",
                  "cold water in the sea at night", "the"],
         "raw": False, "max_query_tokens": 0, "max_doc_tokens": 0, "chunk_long": False, "chunk_overlap": 0},
        {"name": "raw", "query": "why is the river water cold at night",
         "docs": ["the river water is cold at night", "a cat sleeps", LONG * 2, "coffee and tea with milk",
                  "cold water in the sea at night", "the"],
         "raw": True, "max_query_tokens": 0, "max_doc_tokens": 0, "chunk_long": False, "chunk_overlap": 0},
        {"name": "capped query and documents", "query": "how do i reset the password of my phone and camera",
         "docs": ["hold the reset button", LONG, "phone battery and camera lens"],
         "raw": False, "max_query_tokens": 4, "max_doc_tokens": 20, "chunk_long": False, "chunk_overlap": 0},
        {"name": "long documents, chunks, normalized", "query": "bird on a tree by the road",
         "docs": [LONG * 4, "a bird on a tree", LONG * 2 + "a bird on a tree by the road"],
         "raw": False, "max_query_tokens": 0, "max_doc_tokens": 0, "chunk_long": True, "chunk_overlap": 8},
        {"name": "long documents, chunks, raw, capped windows", "query": "bird on a tree by the road",
         "docs": [LONG * 4, "a bird on a tree", LONG * 2 + "a bird on a tree by the road"],
         "raw": True, "max_query_tokens": 0, "max_doc_tokens": 30, "chunk_long": True, "chunk_overlap": 4},
        {"name": "long documents, chunks, default overlap", "query": "the sea at night",
         "docs": [LONG * 3, "the sea at night is dark"],
         "raw": False, "max_query_tokens": 0, "max_doc_tokens": 0, "chunk_long": True, "chunk_overlap": 0},
    ],
}
# One request = one batch (so that the batcher's order of requests cannot matter), one single-thread worker.
KNOBS = {"inference_workers": 1, "intra_op_threads": 1, "embed_max_batch_size": 512, "rerank_max_batch_size": 512,
         "embed_max_batch_tokens": 1_000_000, "rerank_max_batch_tokens": 1_000_000,
         "embed_max_queued_tokens": 2_000_000, "rerank_max_queued_tokens": 2_000_000}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def record(models: Path, index: Path) -> dict:
    import onnxruntime

    from twostage.server.app import load_engine
    from twostage.server.config import Config
    from twostage.server.engine import Timing

    engine = load_engine(Config(models=str(models), index=str(index), **KNOBS), None)
    engine.embed_batcher.start()
    engine.rerank_batcher.start()
    try:
        embeds = []
        for case in CASES["embed"]:
            timing = Timing()
            vectors = await engine._embed_texts(case["texts"], timing, None, max_tokens=case["max_tokens"],
                                                truncate=case["truncate"],
                                                field_name="query" if case["max_tokens"] else "texts")
            embeds.append({"vectors": [[float(x) for x in row] for row in vectors], "tokens": timing.embed.tokens,
                           "items": timing.embed.items})
        reranks = []
        for case in CASES["rerank"]:
            outcome = await engine.rerank(case["query"], texts=case["docs"], raw=case["raw"],
                                          max_query_tokens=case["max_query_tokens"],
                                          max_doc_tokens=case["max_doc_tokens"], chunk_long=case["chunk_long"],
                                          chunk_overlap=case["chunk_overlap"])
            reranks.append({"score_kind": outcome.score_kind, "tokens": outcome.timing.rerank.tokens,
                            "items": outcome.timing.rerank.items,
                            "results": [{"index": r.index, "score": float(r.score), "chunks": r.chunks,
                                         "best_chunk": r.best_chunk, "truncated": r.truncated}
                                        for r in outcome.results]})
    finally:
        await engine.embed_batcher.stop()
        await engine.rerank_batcher.stop()
        engine.index.close()
        engine.pool.shutdown()
    return {
        "recorded_with": "commit 3597c0f, tests/data/record_serving_fixture.py",
        "environment": {
            "bi_encoder_sha256": sha256(models / "bi-encoder" / "model.onnx"),
            "cross_encoder_sha256": sha256(models / "cross-encoder" / "model.onnx"),
            "onnxruntime": onnxruntime.__version__, "machine": platform.machine(), "cpu": cpu_model(),
        },
        "knobs": KNOBS, "cases": CASES, "embed": embeds, "rerank": reranks,
    }


def main() -> None:
    from tiny_models import make_tiny_model_set

    with tempfile.TemporaryDirectory() as tmp:
        models = make_tiny_model_set(Path(tmp) / "models")
        fixture = asyncio.run(record(models, Path(tmp) / "index"))
    out = HERE / "serving_fixture.json"
    out.write_text(json.dumps(fixture, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
