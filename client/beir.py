"""Reading a BEIR-layout folder: the queries and relevance judgments of one split (`twostage evaluate`, bench/).

Layout (as BEIR publishes its datasets):

    FOLDER/corpus.jsonl          {"_id", "title", "text"} per line (read by the index build, not here)
    FOLDER/queries.jsonl         {"_id", "text"} per line; BEIR puts every split's queries in this one file
    FOLDER/queries_SPLIT.jsonl   optional: more queries, for a split kept in a file of its own
    FOLDER/qrels/SPLIT.tsv       query-id <tab> corpus-id <tab> grade, with or without a header line;
                                 TREC's four columns (query-id, iteration, corpus-id, grade) are read too

A split's queries are those with at least one judgment of grade > 0 ("judged"), in the order of the query
files; a query with only grade-0 judgments could score nothing and is left out, as trec_eval leaves it out of
nDCG's ideal. Errors name the file and line.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

Qrels = dict[str, dict[str, int]]


class DatasetError(ValueError):
    """The folder is not a readable BEIR-layout dataset; the message names the file (and line)."""


@dataclass(frozen=True)
class Split:
    """One split of a BEIR folder: judged query id -> text (file order) and query id -> {doc id: grade}."""

    folder: Path
    name: str
    queries: dict[str, str]
    qrels: Qrels

    @property
    def corpus(self) -> Path:
        """The corpus file (corpus.jsonl, or corpus.jsonl.gz when only that exists)."""
        plain = self.folder / "corpus.jsonl"
        packed = self.folder / "corpus.jsonl.gz"
        return packed if packed.is_file() and not plain.is_file() else plain


def read_qrels(path: Path) -> Qrels:
    """query id -> {document id: grade} from a qrels file (3 or 4 tab- or space-separated columns)."""
    if not path.is_file():
        raise DatasetError(f"qrels file not found: {path}")
    qrels: Qrels = {}
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            cols = line.split()
            if not cols:
                continue
            if len(cols) not in (3, 4):
                raise DatasetError(f"{path}:{line_no}: expected 3 columns (query-id, corpus-id, score) or TREC's 4, "
                                   f"got {len(cols)}")
            query, doc, grade = (cols[0], cols[1], cols[2]) if len(cols) == 3 else (cols[0], cols[2], cols[3])
            try:
                value = int(float(grade))
            except ValueError:
                if line_no == 1:  # the header line ("query-id corpus-id score")
                    continue
                raise DatasetError(f"{path}:{line_no}: grade {grade!r} is not a number") from None
            qrels.setdefault(query, {})[doc] = value
    if not qrels:
        raise DatasetError(f"{path}: no judgments")
    return qrels


def read_queries(path: Path) -> dict[str, str]:
    """query id -> text from a jsonl file of {"_id", "text"} objects."""
    queries: dict[str, str] = {}
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as exc:
                raise DatasetError(f"{path}:{line_no}: not valid JSON ({exc})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str) or obj.get("_id") in (None, ""):
                raise DatasetError(f"{path}:{line_no}: expected an object with `_id` and a string `text`")
            queries[str(obj["_id"])] = obj["text"]
    return queries


def judged(qrels: Qrels) -> set[str]:
    """Query ids with at least one document of grade > 0."""
    return {q for q, docs in qrels.items() if any(g > 0 for g in docs.values())}


def available_splits(folder: Path) -> list[str]:
    return sorted(p.stem for p in (Path(folder) / "qrels").glob("*.tsv"))


def load_split(folder: Path | str, split: str = "test") -> Split:
    """The judged queries and the judgments of `split` (qrels/SPLIT.tsv) in a BEIR folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"dataset folder not found: {folder}")
    qrels_path = folder / "qrels" / f"{split}.tsv"
    if not qrels_path.is_file():
        have = ", ".join(available_splits(folder)) or "none"
        raise DatasetError(f"no judgments for split {split!r}: {qrels_path} not found (splits here: {have})")
    qrels = read_qrels(qrels_path)
    texts: dict[str, str] = {}
    sources = [p for p in (folder / "queries.jsonl", folder / f"queries_{split}.jsonl") if p.is_file()]
    if not sources:
        raise DatasetError(f"no queries: neither {folder / 'queries.jsonl'} nor {folder / f'queries_{split}.jsonl'}")
    for path in sources:
        texts.update(read_queries(path))
    wanted = judged(qrels)
    missing = sorted(wanted - set(texts))
    if missing:
        shown = ", ".join(repr(q) for q in missing[:5]) + (" …" if len(missing) > 5 else "")
        raise DatasetError(f"{qrels_path}: {len(missing)} judged queries have no text in "
                           f"{' or '.join(str(p) for p in sources)}: {shown}")
    queries = {q: t for q, t in texts.items() if q in wanted}
    return Split(folder=folder, name=split, queries=queries, qrels={q: qrels[q] for q in queries})
