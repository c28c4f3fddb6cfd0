"""Core of `twostage index build`: a BEIR-style jsonl corpus -> embeddings -> an index directory.

Corpus format: one JSON object per line with `_id` (string; an integer is taken as its decimal
string), `text` (string), optional `title` (string) and optional `metadata` (object). Other keys are
ignored, blank lines skipped; a `.gz` file is read decompressed. Every line is checked (and the ids
for duplicates) before anything is embedded; errors name the file and the line.

Atomicity. The build goes into `<index_dir>.tmp-build/` (staging), never into `index_dir` itself:

  * crash or error while embedding: `index_dir` is untouched; staging holds the documents written so
    far (each batch is a committed SQLite transaction). Running the same build again (same corpus
    content, dimension, metric, dtype, connectivity and embed_fingerprint) resumes: ids already in
    staging are skipped. Anything else in staging is discarded and the build starts over.
  * crash after the build finished (staging holds `build-complete.json`) but before the swap: the
    next build, or `DocumentIndex.open(index_dir)`, sees it (see index.layout.replace_index_dir /
    index.layout.recover_index_dir for each step of the swap) and either moves the new index in or puts the
    old one back; `index_dir` is never left missing or half-written.
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import shutil
import sys
import time
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np

from twostage.client.progress import ProgressBar

from .index.backend import StoredDoc, embedding_text
from .index.durable import write_atomically
from .index.embedded import DocumentIndex
from .index.layout import BUILD_COMPLETE_FILE, DirectoryLock, recover_index_dir, replace_index_dir, staging_dir
from .index.settings import IndexSettings

BUILD_STATE_FILE = "build-state.json"

Embed = Callable[[list[str]], np.ndarray]


class CorpusError(ValueError):
    """The corpus file is unreadable or a line is not a valid document; the message names the line."""


# ---------------------------------------------------------------------------------------------
# Reading the corpus
# ---------------------------------------------------------------------------------------------


def _open_binary(path: Path) -> io.BufferedIOBase:
    if not path.is_file():
        raise CorpusError(f"corpus file not found: {path}")
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def parse_corpus_line(raw: bytes | str, where: str) -> StoredDoc | None:
    """One corpus line -> StoredDoc (None for a blank line); `where` ("file:line") prefixes errors."""
    try:
        line = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError as exc:
        raise CorpusError(f"{where}: not UTF-8 ({exc})") from None
    if not line.strip():
        return None
    try:
        obj = json.loads(line)
    except ValueError as exc:
        raise CorpusError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise CorpusError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    doc_id = obj.get("_id")
    if isinstance(doc_id, int) and not isinstance(doc_id, bool):
        doc_id = str(doc_id)
    if not isinstance(doc_id, str) or not doc_id:
        raise CorpusError(f"{where}: `_id` must be a non-empty string (got {obj.get('_id')!r})")
    text = obj.get("text")
    if not isinstance(text, str):
        raise CorpusError(f"{where}: `text` must be a string (document {doc_id!r})")
    title = obj.get("title")
    title = "" if title is None else title
    if not isinstance(title, str):
        raise CorpusError(f"{where}: `title` must be a string (document {doc_id!r})")
    if not text.strip() and not title.strip():
        raise CorpusError(f"{where}: document {doc_id!r} has neither text nor title")
    metadata = obj.get("metadata")
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict):
        raise CorpusError(f"{where}: `metadata` must be a JSON object (document {doc_id!r})")
    return StoredDoc(doc_id, text, title, metadata)


def iter_corpus_lines(path: Path | str) -> Iterator[tuple[int, StoredDoc]]:
    """(1-based line number, document) for each non-blank line; CorpusError names a bad line."""
    path = Path(path)
    with _open_binary(path) as f:
        for line_no, raw in enumerate(f, 1):
            doc = parse_corpus_line(raw, f"{path}:{line_no}")
            if doc is not None:
                yield line_no, doc


def iter_corpus(path: Path | str) -> Iterator[StoredDoc]:
    """The documents of a BEIR-style jsonl corpus, in file order."""
    for _, doc in iter_corpus_lines(path):
        yield doc


def _id_hash(doc_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "little")


@dataclass
class CorpusSummary:
    documents: int
    sha256: str  # of the (decompressed) content


def check_corpus(path: Path | str) -> CorpusSummary:
    """Validate every line, count documents, fingerprint the content and reject duplicate ids (with
    both line numbers). Memory: 8 bytes per document."""
    path = Path(path)
    digest = hashlib.sha256()
    hashes = array("Q")
    with _open_binary(path) as f:
        for line_no, raw in enumerate(f, 1):
            digest.update(raw)
            doc = parse_corpus_line(raw, f"{path}:{line_no}")
            if doc is not None:
                hashes.append(_id_hash(doc.id))
    if not hashes:
        raise CorpusError(f"{path}: no documents")
    values, counts = np.unique(np.frombuffer(hashes, dtype=np.uint64), return_counts=True)
    suspects = set(values[counts > 1].tolist())
    if suspects:  # confirm (an 8-byte hash can collide) and name the lines
        first_line: dict[str, int] = {}
        for line_no, doc in iter_corpus_lines(path):
            if _id_hash(doc.id) in suspects:
                if doc.id in first_line:
                    raise CorpusError(f"{path}: duplicate _id {doc.id!r} on lines {first_line[doc.id]} and {line_no}")
                first_line[doc.id] = line_no
    return CorpusSummary(documents=len(hashes), sha256=digest.hexdigest())


# ---------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------


@dataclass
class BuildReport:
    index_dir: str
    documents: int  # documents in the corpus (and in the finished index)
    embedded: int  # documents embedded by this run
    skipped: int  # documents already in staging from an interrupted run
    resumed: bool
    seconds: float
    docs_per_s: float  # embedded / seconds
    corpus_sha256: str


def _batches(items: Iterator[tuple[int, StoredDoc]], size: int) -> Iterator[list[StoredDoc]]:
    batch: list[StoredDoc] = []
    for _, doc in items:
        batch.append(doc)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _check_embeddings(vectors: np.ndarray, count: int, dimension: int) -> np.ndarray:
    matrix = np.asarray(vectors, dtype=np.float32)
    if matrix.shape != (count, dimension):
        raise ValueError(f"embed() returned shape {tuple(matrix.shape)} for {count} texts; "
                         f"expected ({count}, {dimension})")
    return matrix


def build_index(corpus: Path | str, index_dir: Path | str, embed: Embed, dimension: int,
                settings: IndexSettings, batch_size: int = 64, progress: bool = True,
                embed_fingerprint: str = "", snapshot_interval_s: float = 120.0,
                progress_stream: TextIO | None = None) -> BuildReport:
    """Embed every document of `corpus` and put the resulting index at `index_dir`, replacing what
    was there only once the new index is complete (see the module docstring for crash behaviour).

    `embed(texts)` must return a (len(texts), dimension) array; `embed_fingerprint` (e.g. the model's
    sha256) guards resuming against a different model.
    """
    corpus, index_dir = Path(corpus), Path(index_dir)
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0 (got {batch_size})")
    settings = dataclasses.replace(settings, view=False)
    started = time.monotonic()
    recover_index_dir(index_dir)
    if index_dir.is_dir():  # fail now, not after hours of embedding, if a server holds the index
        DirectoryLock(index_dir, exclusive=True).release()
    summary = check_corpus(corpus)
    if progress:
        print(f"checked {corpus}: {summary.documents} documents in {time.monotonic() - started:.1f} s",
              file=progress_stream or sys.stderr, flush=True)
    staging = staging_dir(index_dir)
    state = {"corpus_sha256": summary.sha256, "documents": summary.documents, "dimension": dimension,
             "metric": settings.metric, "dtype": settings.dtype, "connectivity": settings.connectivity,
             "embed_fingerprint": embed_fingerprint}
    resumed = _prepare_staging(staging, state)
    embedded = skipped = 0
    if not (staging / BUILD_COMPLETE_FILE).is_file():
        bar = ProgressBar(summary.documents, stream=progress_stream, enabled=progress)
        with DocumentIndex.open(staging, dimension, settings) as index:
            for batch in _batches(iter_corpus_lines(corpus), batch_size):
                if resumed:
                    stored = index.existing_ids(d.id for d in batch)
                    if stored:
                        skipped += len(stored)
                        bar.advance(len(stored), timed=False)
                        batch = [d for d in batch if d.id not in stored]
                        if not batch:
                            continue
                vectors = _check_embeddings(embed([embedding_text(d.title, d.text) for d in batch]),
                                            len(batch), dimension)
                index.upsert(batch, vectors)
                embedded += len(batch)
                bar.advance(len(batch))
                index.maybe_save(snapshot_interval_s)
            bar.close()
            if index.size != summary.documents:
                raise RuntimeError(f"built index holds {index.size} documents but {corpus} has "
                                   f"{summary.documents}; staging left in {staging}")
            index.save()
        seconds = time.monotonic() - started
        write_atomically(staging / BUILD_COMPLETE_FILE, json.dumps(
            {**state, "corpus": str(corpus), "seconds": round(seconds, 3), "finished_at": time.time()},
            indent=1).encode())
    replace_index_dir(staging, index_dir)
    seconds = time.monotonic() - started
    return BuildReport(index_dir=str(index_dir), documents=summary.documents, embedded=embedded,
                       skipped=skipped, resumed=resumed, seconds=round(seconds, 3),
                       docs_per_s=round(embedded / seconds, 2) if seconds > 0 else 0.0,
                       corpus_sha256=summary.sha256)


def _prepare_staging(staging: Path, state: dict) -> bool:
    """Keep a staging directory from an interrupted run of the same build (returns True), else
    start it afresh."""
    if staging.is_dir():
        try:
            previous = json.loads((staging / BUILD_STATE_FILE).read_text())
        except (OSError, ValueError):
            previous = None
        if previous == state:
            return True
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    write_atomically(staging / BUILD_STATE_FILE, json.dumps(state, indent=1).encode())
    return False
