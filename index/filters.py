"""`where` and `where_document` parsed into functions from a replica to a row mask.

Only filters whose meaning is certain are accepted; anything else (invalid shapes, unknown
operators, a regex whose Rust and RE2 meanings could differ) raises NotLocal, and the request
goes to the primary, which answers it (including its 400 errors) itself. Semantics, as measured
against Chroma 1.5.9 (chroma-wire.md section 7, plus tests/index/test_filters.py):

* negations (``$ne``, ``$nin``, ``$not_contains``, document ``$not_contains``/``$not_regex``)
  match rows that lack the key, the metadata or the document;
* ``$gt``/``$gte``/``$lt``/``$lte`` take int/float operands only;
* ``$in``/``$nin`` take a non-empty list of one type (int and float may not be mixed);
* ``$and: []`` matches every row, ``$or: []`` none.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import re2

from .columns import Columns, Mask, scalar_kind
from .errors import NotLocal


class Filterable(Protocol):
    """What a filter needs of a replica."""

    n: int
    columns: Columns
    documents_plain_ascii: bool

    @property
    def documents(self) -> list[str | None]: ...


Filter = Callable[[Filterable], Mask]

_SCALAR = (str, int, float, bool)
_NUMERIC_OPS = {"$gt": "gt", "$gte": "gte", "$lt": "lt", "$lte": "lte"}


def _single(clause: object) -> tuple[str, Any]:
    if not isinstance(clause, dict) or len(clause) != 1:
        raise NotLocal("a filter clause must be an object with exactly one key")
    ((key, value),) = clause.items()
    return key, value


def _logical(op: str, value: object, parse: Callable[[object], Filter]) -> Filter:
    """``$and``/``$or`` over a list of clauses, each parsed with ``parse``."""
    if not isinstance(value, list):
        raise NotLocal(f"{op} takes a list")
    parts = [parse(part) for part in value]

    def run(ctx: Filterable) -> Mask:
        if not parts:
            return np.ones(ctx.n, np.bool_) if op == "$and" else np.zeros(ctx.n, np.bool_)
        out = parts[0](ctx)
        for part in parts[1:]:
            out = (out & part(ctx)) if op == "$and" else (out | part(ctx))
        return out

    return run


def _negate(inner: Filter) -> Filter:
    return lambda ctx: ~inner(ctx)


def parse_where(clause: object) -> Filter:
    """Parse a `where` object (not null)."""
    key, value = _single(clause)
    if key in ("$and", "$or"):
        return _logical(key, value, parse_where)
    if key.startswith("$"):
        raise NotLocal(f"unknown logical operator {key}")
    if key == "#document":
        return _parse_document_operator(value)
    if key.startswith("#") and key != "#id":  # "#id" is an ordinary (absent) key on 1.5.9
        raise NotLocal(f"reserved key {key}")
    return _parse_field(key, value)


def _parse_field(key: str, value: object) -> Filter:
    if isinstance(value, dict):
        op, operand = _single(value)
    else:
        op, operand = "$eq", value
    if op in ("$eq", "$ne"):
        _check_scalar(operand)
        eq: Filter = lambda ctx: ctx.columns[key].eq(operand)  # noqa: E731
        return eq if op == "$eq" else _negate(eq)
    if op in _NUMERIC_OPS:
        if isinstance(operand, bool) or not isinstance(operand, int | float):
            raise NotLocal(f"{op} takes a number")
        name = _NUMERIC_OPS[op]
        return lambda ctx: ctx.columns[key].compare(name, operand)
    if op in ("$in", "$nin"):
        _check_list(operand)
        isin: Filter = lambda ctx: ctx.columns[key].isin(operand)  # noqa: E731
        return isin if op == "$in" else _negate(isin)
    if op in ("$contains", "$not_contains"):
        _check_scalar(operand)
        has: Filter = lambda ctx: ctx.columns[key].array_contains(operand)  # noqa: E731
        return has if op == "$contains" else _negate(has)
    raise NotLocal(f"operator {op} is not replicated")


def _check_scalar(operand: object) -> None:
    if not isinstance(operand, _SCALAR):
        raise NotLocal("operand must be a string, number or boolean")


def _check_list(operand: object) -> None:
    if not isinstance(operand, list) or not operand:
        raise NotLocal("$in/$nin take a non-empty list")
    for item in operand:
        _check_scalar(item)
    if len({scalar_kind(item) for item in operand}) != 1:
        raise NotLocal("$in/$nin lists must hold one type")


def parse_where_document(clause: object) -> Filter:
    """Parse a `where_document` object (not null)."""
    key, value = _single(clause)
    if key in ("$and", "$or"):
        return _logical(key, value, parse_where_document)
    return _parse_document_operator({key: value})


def _parse_document_operator(clause: object) -> Filter:
    op, needle = _single(clause)
    if not isinstance(needle, str):
        raise NotLocal("document operators take a string")
    if op in ("$contains", "$not_contains"):
        found: Filter = lambda ctx: _documents_matching(ctx, lambda d: needle in d)  # noqa: E731
        return found if op == "$contains" else _negate(found)
    if op in ("$regex", "$not_regex"):
        pattern = document_regex(needle)

        def matched(ctx: Filterable) -> Mask:
            if pattern.needs_plain_ascii and not ctx.documents_plain_ascii:
                raise NotLocal("regex class semantics differ on non-ASCII documents")
            return _documents_matching(ctx, lambda d: pattern.regex.search(d) is not None)

        return matched if op == "$regex" else _negate(matched)
    raise NotLocal(f"document operator {op} is not replicated")


def _documents_matching(ctx: Filterable, test: Callable[[str], bool]) -> Mask:
    return np.fromiter(
        (doc is not None and test(doc) for doc in ctx.documents), np.bool_, count=ctx.n
    )


# --- regex: Chroma evaluates with Rust's `regex` crate, which runs in linear time; so does
# RE2 (google-re2), which evaluates it here, and whose syntax is Rust's but for a few corners.
# A backtracking engine would let one `(a+)+b` hold a search thread for minutes (issue 12).
# Patterns are answered locally only where RE2 and Rust are known to agree. ----------------

_SAFE_ESCAPES = set(".\\-[](){}*+?|^$/ntr")
# RE2's \d \w \s \b are ASCII, Rust's Unicode: they agree on plain ASCII documents.
_CLASS_ESCAPES = set("dDwWsSbB")
_INLINE = re.compile(r"\(\?([ims]*)(\)|:)")
_QUANTIFIER = re.compile(r"\{\d+(,\d*)?\}")
_OPTIONS = re2.Options()
_OPTIONS.log_errors = False  # a pattern RE2 refuses is forwarded, not logged to stderr


class DocumentRegex:
    __slots__ = ("needs_plain_ascii", "regex")

    def __init__(self, regex: Any, needs_plain_ascii: bool) -> None:
        self.regex = regex  # re2._Regexp: .search(text) is None or a match
        self.needs_plain_ascii = needs_plain_ascii


def document_regex(pattern: str) -> DocumentRegex:
    """Compile ``pattern`` with RE2 if it means there what it means to Rust's `regex`; else
    NotLocal (the primary answers, including its own error for an invalid pattern).

    Both agree on: literals, `.`, classes (POSIX ones included: ASCII in both), `^` and `$`
    (end of text only, unlike Python's `$`), alternation, groups and non-capturing groups,
    greedy and lazy quantifiers, counted repetition up to RE2's 1,000, the inline flags
    i, m, s. Not local: escapes other than punctuation and \\n \\t \\r (Unicode classes
    \\p{..}, \\x.., \\A/\\z differ or are Rust-only), look-arounds and back-references (Rust
    refuses them: an error the primary gives), named groups, class set operations (`&&`,
    `--`, `~~`: Rust only), and a `{` that is not a repetition."""
    needs_ascii = False
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\":
            nxt = pattern[i + 1 : i + 2]
            if nxt in _CLASS_ESCAPES:
                needs_ascii = True
            elif not nxt or nxt not in _SAFE_ESCAPES:
                raise NotLocal(f"regex escape \\{nxt} is not replicated")
            i += 2
            continue
        if ch == "[" and any(op in pattern[i:] for op in ("&&", "--", "~~")):
            raise NotLocal("class set operations are not replicated")
        if ch == "(" and pattern.startswith("(?", i):
            match = _INLINE.match(pattern, i)
            if match is None:
                raise NotLocal("regex group syntax is not replicated")
            needs_ascii = needs_ascii or "i" in match.group(1)
        if ch == "{" and not _QUANTIFIER.match(pattern, i):
            raise NotLocal("a literal { is not replicated")
        i += 1
    try:
        return DocumentRegex(re2.compile(pattern, _OPTIONS), needs_ascii)
    except re2.error as exc:  # the primary will explain in its own words
        raise NotLocal(f"regex does not compile: {exc}") from None


def plain_ascii(documents: list[str | None]) -> bool:
    """True if every document is printable ASCII plus tab, newline and carriage return, where
    RE2 and Rust agree on \\w, \\d, \\s, \\b and case folding."""
    return all(doc is None or (doc.isascii() and not _ODD_ASCII.search(doc)) for doc in documents)


_ODD_ASCII = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
