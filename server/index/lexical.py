"""Lexical (BM25) query analysis for the embedded backend's SQLite FTS5 index: user text -> a MATCH expression
that can only ever mean "any of these words".

Analysis is the same at index and query time because the FTS5 tokenizer does all of it on both sides
(`LEXICAL_TOKENIZER`: Unicode 6.1 word boundaries, case folding, diacritics removed, Porter stemming). Python
only cuts the query into words and drops stop words; each word goes to FTS5 as a double-quoted string (a
literal to FTS5's query parser, whatever it holds), which FTS5 runs through that same tokenizer. So the query
side never case-folds, normalizes or stems on its own (Python's casefold() or NFKC would disagree with the
tokenizer on, e.g., "ß" or the "ﬁ" ligature, and those words would stop matching).

Words are cut at characters of the Unicode categories that unicode61 treats as separators (punctuation, space,
control and format characters, math, currency and modifier symbols), so that a word is never cut where FTS5
would not cut it; where FTS5 cuts inside a word (at symbols such as "©" or at combining vowel signs), the quoted
word becomes a short phrase that matches the same consecutive tokens in a document. unicode61 knows Unicode 6.1
and takes any character assigned later for a word character (emoji skin tones, newer punctuation), so only
characters already assigned in Unicode 3.2 (the oldest table Python keeps) cut words here. Checked over every
code point (SQLite 3.40, Python 3.11): no cut falls inside an FTS5 token.

The words are joined with OR and scored by FTS5's bm25() (k1 = 1.2, b = 0.75, fixed in SQLite).
"""
from __future__ import annotations

import unicodedata

# The FTS5 tokenizer of the lexical index (store.py creates the table with it; changing it needs a new store
# format and a rebuild of the FTS table).
LEXICAL_TOKENIZER = "porter unicode61 remove_diacritics 2"

# Unicode general categories that end a word: punctuation (P*), separators (Z*), control and format characters,
# surrogates (never valid text; they would also fail UTF-8 encoding), and math, currency and modifier symbols.
_SEPARATOR_CATEGORIES = frozenset({"Pc", "Pd", "Ps", "Pe", "Pi", "Pf", "Po", "Zs", "Zl", "Zp",
                                   "Cc", "Cf", "Cs", "Sm", "Sc", "Sk"})

# English function words dropped from queries: they occur in most documents, so they add almost nothing to a
# BM25 score but make FTS5 visit most of the index. Compared after NFKC and case folding. ("and", "or" and
# "not" are here as English words; quoting already keeps FTS5 from reading them as operators.)
STOP_WORDS = frozenset("""
a an the and or but nor not no if then than so as
of in on at to from by for with without into onto over under about between through during
is are was were be been being am do does did doing has have had having
i me my we us our you your he him his she her it its they them their
this that these those there here which who whom whose what when where why how
will would shall should can could may might must
s t
""".split())


def _is_separator(ch: str) -> bool:
    return unicodedata.category(ch) in _SEPARATOR_CATEGORIES and unicodedata.ucd_3_2_0.category(ch) != "Cn"


def _words(text: str) -> list[str]:
    """`text` cut at separator characters, in order."""
    words: list[str] = []
    start = None
    for i, ch in enumerate(text):
        if _is_separator(ch):
            if start is not None:
                words.append(text[start:i])
                start = None
        elif start is None:
            start = i
    if start is not None:
        words.append(text[start:])
    return words


def _fold(word: str) -> str:
    """The form a word is compared in for stop words and duplicates."""
    return unicodedata.normalize("NFKC", word).casefold()


def query_terms(text: str, *, stop_words: frozenset[str] = STOP_WORDS) -> list[str]:
    """The words of a query that go to the lexical index: cut at separators, stop words dropped, each word
    once (first spelling kept), in order. Empty when nothing is left (the search then finds nothing)."""
    seen: set[str] = set()
    terms: list[str] = []
    for word in _words(text):
        folded = _fold(word)
        if folded in stop_words or folded in seen:
            continue
        seen.add(folded)
        terms.append(word)
    return terms


def match_expression(terms: list[str]) -> str:
    """An FTS5 MATCH expression for "any of `terms`": each a double-quoted string (inner quotes doubled, the
    only escape FTS5 strings have), joined with OR. `terms` must not be empty."""
    if not terms:
        raise ValueError("no terms to match")
    return " OR ".join('"' + term.replace('"', '""') + '"' for term in terms)
