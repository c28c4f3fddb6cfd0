"""What a metadata filter means, and the SQL pre-filter the embedded backend narrows rows with.

A document matches a filter when every key of the filter is a top-level key of its metadata holding an equal
JSON value (`metadata_matches`; numbers by value, so 3 == 3.0 as protobuf Struct sends every number as a
double; booleans only equal booleans). That function is the definition; `filter_sql` is a condition that every
matching row satisfies and that SQLite can evaluate, so that fewer rows need decoding. Filter keys and values
reach SQLite only as bound parameters; a key that cannot be written as a quoted JSON path is left to
`metadata_matches` alone.
"""
from __future__ import annotations

from .backend import Filter


def json_equal(a: object, b: object) -> bool:
    """Equality of JSON values: numbers compare by value (3 == 3.0), booleans only equal booleans."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, str) or isinstance(b, str):
        return isinstance(a, str) and isinstance(b, str) and a == b
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    return False


def metadata_matches(metadata: dict[str, object], filter: Filter) -> bool:
    """True when every key of `filter` is in `metadata` with an equal JSON value."""
    return all(key in metadata and json_equal(metadata[key], value) for key, value in filter.items())


def _json_path(key: str) -> str | None:
    """SQLite JSON path of a top-level key, or None when the key cannot be quoted safely."""
    if any(c in key for c in '"\\') or any(ord(c) < 32 for c in key):
        return None
    return f'$."{key}"'


def filter_sql(filter: Filter) -> tuple[str, list[object]]:
    """A SQL condition on the `metadata` column that every matching row satisfies, and its parameters (a
    pre-filter: rows that pass are checked again with `metadata_matches`)."""
    clauses: list[str] = []
    params: list[object] = []
    for key, value in filter.items():
        path = _json_path(key)
        if path is None:
            continue
        if value is None:
            clauses.append("json_type(metadata, ?) = 'null'")
            params.append(path)
        elif isinstance(value, bool):
            clauses.append(f"json_type(metadata, ?) = '{'true' if value else 'false'}'")
            params.append(path)
        elif isinstance(value, (int, float)):
            if isinstance(value, int) and not -2**63 <= value < 2**63:
                continue  # beyond SQLite integers: left to metadata_matches
            clauses.append("json_type(metadata, ?) IN ('integer', 'real') AND json_extract(metadata, ?) = ?")
            params += [path, path, value]
        elif isinstance(value, str):
            clauses.append("json_type(metadata, ?) = 'text' AND json_extract(metadata, ?) = ?")
            params += [path, path, value]
        elif isinstance(value, (list, tuple)):
            clauses.append("json_type(metadata, ?) = 'array'")
            params.append(path)
        elif isinstance(value, dict):
            clauses.append("json_type(metadata, ?) = 'object'")
            params.append(path)
    return (" AND ".join(f"({c})" for c in clauses) or "1"), params
