"""`twostage serve` and `twostage index build` (mounted by client/cli.py)."""
from __future__ import annotations

import argparse
import asyncio
import sys
import threading
from pathlib import Path

import numpy as np

from twostage.server import config as config_mod
from twostage.server.config import Config

INDEX_KNOBS = ("models", "index", "index_metric", "index_dtype", "index_connectivity", "index_expansion_add",
               "index_expansion_search", "intra_op_threads", "execution_provider", "embed_max_batch_tokens",
               "embed_max_batch_size", "embed_max_delay_ms", "log_level", "log_format",
               "milvus_uri", "milvus_collection", "milvus_timeout_s")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Serve Search, Rerank, Embed, Upsert, Delete and Info over gRPC. Every option can also "
                          "come from --config FILE or a TWOSTAGE_<OPTION> environment variable "
                          "(flag > environment > file > default).")
    config_mod.add_arguments(parser)


def run_serve(args: argparse.Namespace) -> int:
    from twostage.server.app import serve_forever, setup_logging

    try:
        config = Config.from_sources(args)
    except ValueError as exc:
        print(f"twostage serve: {exc}", file=sys.stderr)
        return 2
    setup_logging(config)
    return asyncio.run(serve_forever(config))


def add_index_build_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Embed a BEIR-style corpus (jsonl with _id, title, text, optional metadata) with the "
                          "exported bi-encoder and build the usearch index + document store (--index DIR), or a Milvus "
                          "collection (--milvus-uri URI --collection NAME). The build is atomic: a crash leaves the "
                          "previous index intact.")
    parser.add_argument("--corpus", required=True, type=Path, help="corpus file (.jsonl)")
    parser.add_argument("--batch-size", type=int, default=256,
                        help="texts handed to the batcher at a time (default: 256)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (default: show it)")
    config_mod.add_arguments(parser, only=INDEX_KNOBS)


class BackgroundEmbedder:
    """A synchronous `embed(texts) -> vectors` backed by the server's `EmbeddingRole` (model + batcher) on a
    private event loop, so that `index build` embeds through exactly the code path the server uses. Batching is
    always on here and the queue bound is raised to at least 10M tokens (one caller, large batches of texts)."""

    def __init__(self, config: Config):
        import dataclasses

        from twostage.model.model_set import open_embedder
        from twostage.server.roles import BatchLimits, EmbeddingRole, inference_pool, session_settings

        self.model = open_embedder(Path(config.models), session_settings(config))
        limits = BatchLimits.from_config(config, "embed")
        limits = dataclasses.replace(limits, enabled=True, max_queued_tokens=max(limits.max_queued_tokens, 10_000_000))
        self._pool = inference_pool(config, name="index-build")
        self.role = EmbeddingRole(self.model, self._pool, limits)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="embed-loop", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result()

    async def _start(self) -> None:
        self.role.start()

    @property
    def dimension(self) -> int:
        return int(self.model.dimension)

    def embed(self, texts: list[str]) -> np.ndarray:
        from twostage.server.batcher import Priority

        work = self.role.embed(texts, priority=Priority.BULK)
        return asyncio.run_coroutine_threadsafe(work, self._loop).result().vectors

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.role.stop(drain_timeout=1.0), self._loop).result()
        self._pool.shutdown()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)


def run_index_build(args: argparse.Namespace) -> int:
    from twostage.server.errors import TwoStageError
    from twostage.server.index.settings import IndexSettings
    from twostage.server.indexing import CorpusError, build_index

    try:
        config = Config.from_sources(args)
    except ValueError as exc:
        print(f"twostage index build: {exc}", file=sys.stderr)
        return 2
    if not args.corpus.is_file():
        print(f"twostage index build: corpus not found: {args.corpus}", file=sys.stderr)
        return 2
    embedder = BackgroundEmbedder(config)
    try:
        if config.milvus_uri:
            from twostage.server.index.milvus import MilvusSettings, ModelFingerprint, build_collection

            report = build_collection(args.corpus, MilvusSettings.from_config(config),
                                      ModelFingerprint.of(embedder.model), embedder.embed,
                                      batch_size=args.batch_size, progress=not args.no_progress)
        else:
            report = build_index(args.corpus, Path(config.index), embedder.embed, embedder.dimension,
                                 IndexSettings.from_config(config), batch_size=args.batch_size,
                                 progress=not args.no_progress, embed_fingerprint=embedder.model.sha256)
    except (CorpusError, TwoStageError) as exc:
        print(f"twostage index build: {exc}", file=sys.stderr)
        return 2
    finally:
        embedder.close()
    print(f"indexed {report.documents} documents into {report.index_dir} in {report.seconds:.1f} s "
          f"({report.docs_per_s:.0f} docs/s; embedded {report.embedded}, resumed {report.skipped})", file=sys.stderr)
    return 0
