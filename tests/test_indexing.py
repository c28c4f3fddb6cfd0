"""`index build` core: corpus reading and validation, embedding, atomic swap, resume, progress."""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest

from twostage.server import indexing
from twostage.server.errors import FailedPrecondition
from twostage.server.index.backend import embedding_text
from twostage.server.index.embedded import DocumentIndex
from twostage.server.index.layout import BUILD_COMPLETE_FILE, aside_dir, staging_dir
from twostage.server.index.settings import IndexSettings
from twostage.server.indexing import (CorpusError, ProgressBar, build_index, check_corpus,
                                      iter_corpus, iter_corpus_lines)

DIM = 24


def hash_embed(texts: list[str]) -> np.ndarray:
    """A deterministic text -> unit vector map standing in for the bi-encoder (same text, same vector)."""
    rows = []
    for text in texts:
        seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
        v = np.random.default_rng(seed).normal(size=DIM)
        rows.append(v / np.linalg.norm(v))
    return np.array(rows, dtype=np.float32)


class CountingEmbed:
    """hash_embed that counts texts and can fail on its n-th call."""

    def __init__(self, fail_on_call: int | None = None):
        self.calls = 0
        self.texts: list[str] = []
        self.fail_on_call = fail_on_call

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.calls += 1
        if self.fail_on_call is not None and self.calls == self.fail_on_call:
            raise RuntimeError("embedding failed (simulated)")
        self.texts += texts
        return hash_embed(texts)


def write_corpus(path: Path, n: int, prefix: str = "doc", titled: bool = True) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            row = {"_id": f"{prefix}{i}", "title": f"Heading {i}" if titled and i % 2 == 0 else "",
                   "text": f"body number {i} of {prefix}", "metadata": {"part": i % 3}}
            f.write(json.dumps(row) + "\n")
    return path


SETTINGS = IndexSettings(expansion_add=32)


def build(corpus: Path, index_dir: Path, embed=hash_embed, **kw) -> indexing.BuildReport:
    return build_index(corpus, index_dir, embed, DIM, SETTINGS, batch_size=kw.pop("batch_size", 16),
                       progress_stream=kw.pop("progress_stream", io.StringIO()), **kw)


def test_build_creates_a_searchable_index(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.jsonl", 100)
    embed = CountingEmbed()
    report = build(corpus, tmp_path / "ix", embed)
    assert (report.documents, report.embedded, report.skipped, report.resumed) == (100, 100, 0, False)
    assert report.corpus_sha256 == hashlib.sha256(corpus.read_bytes()).hexdigest()
    assert "Heading 0. body number 0 of doc" in embed.texts  # title joined by embedding_text
    assert "body number 1 of doc" in embed.texts  # no title: text alone
    assert not staging_dir(tmp_path / "ix").exists()
    with DocumentIndex.open(tmp_path / "ix", DIM, SETTINGS) as index:
        assert index.size == 100 and index.opened_from == "snapshot"
        doc = index.get(["doc4"])["doc4"]
        assert (doc.title, doc.text, doc.metadata) == ("Heading 4", "body number 4 of doc", {"part": 1})
        query = hash_embed([embedding_text(doc.title, doc.text)])[0]
        assert index.search(query, 1).hits[0].id == "doc4"
        assert all(h.id.startswith("doc") for h in index.search(query, 5, filter={"part": 1.0}).hits)


def test_bad_line_is_reported_with_its_line_number(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.jsonl", 5)
    lines = corpus.read_text().splitlines()
    cases = {
        '{"_id": "x", "text": "a"': r"corpus.jsonl:3: not valid JSON",
        '["a list"]': r"corpus.jsonl:3: expected a JSON object",
        '{"text": "no id"}': r"corpus.jsonl:3: `_id` must be a non-empty string",
        '{"_id": "x", "text": 5}': r"corpus.jsonl:3: `text` must be a string",
        '{"_id": "x", "text": "t", "metadata": [1]}': r"corpus.jsonl:3: `metadata` must be a JSON object",
        '{"_id": "x", "text": " ", "title": ""}': r"corpus.jsonl:3: document 'x' has neither text nor title",
    }
    for bad, message in cases.items():
        corpus.write_text("\n".join(lines[:2] + [bad] + lines[2:]) + "\n")
        with pytest.raises(CorpusError, match=message):
            build(corpus, tmp_path / "ix")
        assert not (tmp_path / "ix").exists() and not staging_dir(tmp_path / "ix").exists()
    corpus.write_bytes(b'{"_id": "a", "text": "ok"}\n{"_id": "b", "text": "\xff\xfe"}\n')
    with pytest.raises(CorpusError, match=r"corpus.jsonl:2: not UTF-8"):
        check_corpus(corpus)


def test_duplicate_ids_are_reported_with_both_lines(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"_id": "a", "text": "x"}\n\n{"_id": "b", "text": "y"}\n{"_id": "a", "text": "z"}\n')
    with pytest.raises(CorpusError, match=r"duplicate _id 'a' on lines 1 and 4"):
        check_corpus(corpus)


def test_corpus_reader_accepts_gzip_blank_lines_integer_ids_and_null_fields(tmp_path):
    rows = ['{"_id": 7, "text": "seven", "title": null, "metadata": null, "extra": 1}', "",
            '{"_id": "b", "title": "only a title", "text": ""}']
    corpus = tmp_path / "c.jsonl.gz"
    with gzip.open(corpus, "wt") as f:
        f.write("\n".join(rows) + "\n")
    assert [(n, d.id, d.title, d.metadata) for n, d in iter_corpus_lines(corpus)] == [
        (1, "7", "", {}), (3, "b", "only a title", {})]
    assert [d.text for d in iter_corpus(corpus)] == ["seven", ""]
    assert check_corpus(corpus).documents == 2
    with pytest.raises(CorpusError, match="not found"):
        check_corpus(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(CorpusError, match="no documents"):
        check_corpus(tmp_path / "empty.jsonl")


def test_failed_build_leaves_the_previous_index_intact_and_resumes(tmp_path):
    index_dir = tmp_path / "ix"
    build(write_corpus(tmp_path / "a.jsonl", 40, prefix="old"), index_dir)
    new_corpus = write_corpus(tmp_path / "b.jsonl", 100, prefix="new")

    with pytest.raises(RuntimeError, match="simulated"):
        build(new_corpus, index_dir, CountingEmbed(fail_on_call=4))  # 3 batches of 16 written
    with DocumentIndex.open(index_dir, DIM, SETTINGS) as index:  # the previous index, untouched
        assert index.size == 40 and set(index.get(["old0", "new0"])) == {"old0"}
    assert staging_dir(index_dir).is_dir()

    embed = CountingEmbed()
    report = build(new_corpus, index_dir, embed)
    assert report.resumed and report.skipped == 48 and report.embedded == 52
    assert len(embed.texts) == 52
    with DocumentIndex.open(index_dir, DIM, SETTINGS) as index:
        assert index.size == 100 and set(index.get(["old0", "new0", "new99"])) == {"new0", "new99"}
        index.verify()
    assert not staging_dir(index_dir).exists() and not aside_dir(index_dir).exists()


def test_staging_from_a_different_build_is_discarded(tmp_path):
    index_dir = tmp_path / "ix"
    corpus = write_corpus(tmp_path / "a.jsonl", 40)
    with pytest.raises(RuntimeError):
        build(corpus, index_dir, CountingEmbed(fail_on_call=2))
    report = build(corpus, index_dir, embed_fingerprint="another model")
    assert not report.resumed and report.embedded == 40


def test_interrupted_swap_is_finished_or_undone(tmp_path, monkeypatch):
    index_dir = tmp_path / "ix"
    build(write_corpus(tmp_path / "a.jsonl", 20, prefix="old"), index_dir)
    new_corpus = write_corpus(tmp_path / "b.jsonl", 30, prefix="new")

    def crash_after_step_1(new_dir: Path, target: Path) -> None:
        os.rename(target, aside_dir(target))
        raise KeyboardInterrupt("crash between the two renames")

    monkeypatch.setattr(indexing, "replace_index_dir", crash_after_step_1)
    with pytest.raises(KeyboardInterrupt):
        build(new_corpus, index_dir)
    assert not index_dir.exists() and (staging_dir(index_dir) / BUILD_COMPLETE_FILE).is_file()
    with DocumentIndex.open(index_dir, DIM, SETTINGS) as index:  # open finishes the swap
        assert index.size == 30 and "new0" in index.get(["new0"])
    assert not aside_dir(index_dir).exists() and not staging_dir(index_dir).exists()

    # the same crash, but the build in staging was never finished: the old index comes back
    os.rename(index_dir, aside_dir(index_dir))
    staging_dir(index_dir).mkdir()
    with DocumentIndex.open(index_dir, DIM, SETTINGS) as index:
        assert index.size == 30
    assert not aside_dir(index_dir).exists()

    # a crash after both renames leaves only the aside copy to remove
    aside_dir(index_dir).mkdir()
    monkeypatch.undo()
    report = build(new_corpus, index_dir)
    assert not aside_dir(index_dir).exists() and report.documents == 30


def test_build_refuses_an_index_held_by_a_server(tmp_path):
    index_dir = tmp_path / "ix"
    corpus = write_corpus(tmp_path / "a.jsonl", 10)
    build(corpus, index_dir)
    with DocumentIndex.open(index_dir, DIM, SETTINGS):
        with pytest.raises(FailedPrecondition, match="in use"):
            build(corpus, index_dir)
    assert not staging_dir(index_dir).exists()


def test_embed_output_shape_is_checked(tmp_path):
    corpus = write_corpus(tmp_path / "a.jsonl", 10)
    with pytest.raises(ValueError, match=r"embed\(\) returned shape \(10, 8\) for 10 texts; expected \(10, 24\)"):
        build(corpus, tmp_path / "ix", lambda texts: np.zeros((len(texts), 8), np.float32))
    assert not (tmp_path / "ix").exists()


def test_progress_bar_reports_rate_and_eta(tmp_path):
    out = io.StringIO()
    bar = ProgressBar(200, stream=out, min_interval_s=0)
    bar.started -= 2.0  # as if two seconds had passed
    bar.advance(50, timed=False)  # resumed documents do not count toward the rate
    bar.advance(100)
    line = bar.line()
    assert line.startswith("indexing 150/200 docs  75.0%")
    assert "docs/s" in line and "ETA 0:00:01" in line
    bar.close()
    assert out.getvalue().count("\n") >= 1

    stream = io.StringIO()
    build(write_corpus(tmp_path / "a.jsonl", 20), tmp_path / "ix", progress_stream=stream)
    assert "indexing 20/20 docs 100.0%" in stream.getvalue()
    quiet = io.StringIO()
    build(write_corpus(tmp_path / "b.jsonl", 20), tmp_path / "ix2", progress_stream=quiet, progress=False)
    assert quiet.getvalue() == ""
