"""The embedded backend's lexical index beyond the backend contract: query analysis and quoting
(server/index/lexical.py), agreement of the query-side word split with the FTS5 tokenizer, stemming and
diacritics, the integrity check. Store-format upgrades and crashes: tests/test_index.py.

Texts written for these tests; small random vectors."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from twostage.server.errors import FailedPrecondition
from twostage.server.index.backend import StoredDoc
from twostage.server.index.embedded import DocumentIndex
from twostage.server.index.layout import STORE_FILE
from twostage.server.index.lexical import LEXICAL_TOKENIZER, STOP_WORDS, _words, match_expression, query_terms
from twostage.server.index.settings import IndexSettings

DIM = 8


def vectors(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)


@pytest.fixture
def index(tmp_path: Path):
    ix = DocumentIndex.open(tmp_path / "ix", DIM, IndexSettings())
    yield ix
    ix.close()


# ------------------------------------------------------------------------------------------ query analysis
def test_query_terms_split_drop_stop_words_and_repeats():
    assert query_terms("Why does the kite fly?") == ["kite", "fly"]
    assert query_terms("kite KITE Kite kites") == ["kite", "kites"]  # first spelling kept; stemming is FTS5's
    assert query_terms("don't stop-words: AND, OR, NOT!") == ["don", "stop", "words"]
    assert query_terms("col:term ^x (y) -z p*q") == ["col", "term", "x", "y", "z", "p", "q"]
    assert query_terms("snake_case e-mail 3.5") == ["snake", "case", "e", "mail", "3", "5"]
    assert query_terms('say "hi"') == ["say", "hi"]
    assert query_terms("THE The the") == [] and query_terms("") == [] and query_terms(" \t\n.,;") == []
    assert query_terms("Ｔｈｅ") == []  # stop words compared after NFKC and case folding
    assert query_terms("grüße 天线 🙂 x\x00y \ud800z") == ["grüße", "天线", "🙂", "x", "y", "z"]
    assert query_terms("the kite", stop_words=frozenset()) == ["the", "kite"]
    assert {"and", "or", "not", "the", "a", "of"} <= STOP_WORDS


def test_match_expression_quotes_every_term():
    assert match_expression(["kite", "fly"]) == '"kite" OR "fly"'
    assert match_expression(['a"b', "NEAR", "*"]) == '"a""b" OR "NEAR" OR "*"'  # inner quotes doubled
    with pytest.raises(ValueError):
        match_expression([])


def fts5_tokens(conn: sqlite3.Connection, text: str) -> list[str]:
    """The tokens the lexical index's tokenizer makes of `text`, in order."""
    conn.execute("DELETE FROM probe")
    conn.execute("INSERT INTO probe(rowid, t) VALUES (1, ?)", (text,))
    return [t for (t,) in conn.execute("SELECT term FROM probe_vocab ORDER BY offset")]


@pytest.fixture(scope="module")
def tokenizer() -> sqlite3.Connection:
    conn = sqlite3.connect(":memory:")
    conn.execute(f"CREATE VIRTUAL TABLE probe USING fts5(t, tokenize='{LEXICAL_TOKENIZER}')")
    conn.execute("CREATE VIRTUAL TABLE probe_vocab USING fts5vocab(probe, 'instance')")
    return conn


# Characters from scripts and classes that matter: ASCII, Latin-1 and accents, combining marks, Greek, Cyrillic,
# Devanagari (vowel signs FTS5 splits at), CJK, Arabic, symbols (math, currency, modifier, other), emoji, spaces
# and controls.
ALPHABET = st.sampled_from(list(
    "abcXYZ019_-'\".,;:!?()[]{}*^+=<>|/\\@#$%&~` \t\n\x00\x1f\u00a0\u200b\u2028"
    "éüßÆøñçǅ\u0301\u0308ΣσςΑβДжя\u0939\u093f\u0928\u094d\u0926\u0940東京天线タワーهوائي"
    "€£¥©®°±×÷¬¦§¶µ¹²³¼ﬁＡａ１🙂👍🏽"))


@settings(max_examples=300, deadline=None)
@given(st.text(ALPHABET, max_size=40))
@example("hello🙂world foo_bar don't हिन्दी C++ x=y ©2024")
def test_query_words_are_never_cut_inside_an_fts5_token(tokenizer: sqlite3.Connection, text: str):
    """The query side cuts text only where the FTS5 tokenizer does too, so each quoted word becomes the same
    tokens (one, or a short phrase) that the index made of that text."""
    words = _words(text)
    assert [tok for word in words for tok in fts5_tokens(tokenizer, word)] == fts5_tokens(tokenizer, text)


# --------------------------------------------------------------------------------------- analysis in the index
def test_stemming_case_and_diacritics_are_the_same_on_both_sides(index: DocumentIndex):
    index.upsert([StoredDoc("run", "She runs every morning."),
                  StoredDoc("cafe", "A crème brûlée at the Café."),
                  StoredDoc("street", "Die Straße ist lang."),
                  StoredDoc("liga", "The ﬁeld was wide."),
                  StoredDoc("title", "no words in common here", "Migration of birds")], vectors(5))
    assert [h.id for h in index.lexical_search("running", 5).hits] == ["run"]
    assert [h.id for h in index.lexical_search("CREME brulee cafe", 5).hits] == ["cafe"]
    assert [h.id for h in index.lexical_search("STRASSE", 5).hits] == []  # unicode61 does not fold ß to ss...
    assert [h.id for h in index.lexical_search("straße", 5).hits] == ["street"]  # ...nor does the query side
    assert [h.id for h in index.lexical_search("ﬁeld", 5).hits] == ["liga"]  # no NFKC on either side
    assert [h.id for h in index.lexical_search("migrating birds", 5).hits] == ["title"]  # titles are searched


def test_stop_words_only_find_nothing(index: DocumentIndex):
    index.upsert([StoredDoc("a", "the and or not of")], vectors(1))
    found = index.lexical_search("The AND or", 5)
    assert found.hits == [] and found.strategy == "lexical-no-terms"


def test_a_stored_text_of_any_content_is_searchable(index: DocumentIndex):
    odd = ['"quoted" NEAR(x) AND *', "\x00null inside", "col:umn ^start", "emoji🙂word"]
    index.upsert([StoredDoc(f"d{i}", text) for i, text in enumerate(odd)], vectors(len(odd)))
    assert [h.id for h in index.lexical_search("quoted", 5).hits] == ["d0"]
    assert [h.id for h in index.lexical_search("umn", 5).hits] == ["d2"]
    assert [h.id for h in index.lexical_search("emoji🙂word", 5).hits] == ["d3"]
    assert index.verify() == len(odd)


def test_verify_notices_a_lexical_index_out_of_step(tmp_path: Path):
    path = tmp_path / "ix"
    with DocumentIndex.open(path, DIM, IndexSettings()) as ix:
        ix.upsert([StoredDoc("a", "alpha words"), StoredDoc("b", "beta words")], vectors(2))
        assert ix.verify() == 2
    conn = sqlite3.connect(path / STORE_FILE)  # change a text behind the triggers' back
    conn.execute("DROP TRIGGER documents_lexical_update")
    conn.execute("UPDATE documents SET text = 'gamma' WHERE id = 'a'")
    conn.commit()
    conn.close()
    with DocumentIndex.open(path, DIM, IndexSettings()) as ix:
        with pytest.raises(FailedPrecondition, match="lexical index differs"):
            ix.verify()
