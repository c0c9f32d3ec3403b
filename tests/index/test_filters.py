"""Filter semantics, checked against answers recorded from a real Chroma 1.5.9 server.

The rows, documents and expected ids below were sent to `chroma run` and its answers copied
here (see chroma-wire.md section 7 for the same facts in prose). The live parity tests in
tests/integration/test_replica_parity.py compare with a running server as well.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from index.columns import Columns
from index.errors import NotLocal
from index.filters import document_regex, parse_where, parse_where_document, plain_ascii

ROWS: dict[str, dict[str, Any] | None] = {
    "r1": {"s": "apple", "i": 1, "f": 1.5, "b": True, "tags": ["a", "b"], "nums": [1, 2, 3],
           "fl": [0.5, 1.5], "bl": [True]},
    "r2": {"s": "banana", "i": 2, "f": 2.0, "b": False, "tags": ["b", "c"], "nums": [3, 4]},
    "r3": {"s": "cherry", "i": 3, "f": 3.25, "tags": ["c"]},
    "r4": {"s": "Apple pie", "i": -5, "f": -0.5, "b": True},
    "r5": {"i": 10},
    "r6": None,
    "r7": {"s": "", "i": 0, "f": 0.0, "b": False, "tags": ["a"]},
    "r8": {"s": "1", "i": 1.0},
    "r9": {"fl": [1.0, 2.0], "big": 9007199254740993},
}  # fmt: skip
DOCS = ["the quick fox", "lazy dog", "Quick brown", "", "naïve café", "x\ny", None, "foo$", "ab"]
ALL = list(ROWS)


@dataclass
class Rows:
    metadatas: list[dict[str, Any] | None] = field(default_factory=lambda: list(ROWS.values()))
    documents: list[str | None] = field(default_factory=lambda: list(DOCS))

    def __post_init__(self) -> None:
        self.n = len(self.metadatas)
        self.columns = Columns(self.metadatas)
        self.documents_plain_ascii = plain_ascii(self.documents)


def ids(mask: np.ndarray[Any, Any]) -> list[str]:
    return [ALL[i] for i in np.flatnonzero(mask)]


WHERE = [
    ({"nums": {"$contains": 1.0}}, []),
    ({"fl": {"$contains": 1}}, []),
    ({"fl": {"$contains": 1.5}}, ["r1"]),
    ({"nums": {"$contains": 3}}, ["r1", "r2"]),
    ({"bl": {"$contains": 1}}, []),
    ({"bl": {"$contains": True}}, ["r1"]),
    ({"b": {"$gt": 0}}, []),
    ({"i": True}, []),
    ({"b": 1}, []),
    ({"i": 1}, ["r1", "r8"]),
    ({"i": {"$nin": [1.0]}}, ["r2", "r3", "r4", "r5", "r6", "r7", "r9"]),
    ({"i": {"$gte": 1}}, ["r1", "r2", "r3", "r5", "r8"]),
    ({"i": {"$gt": 1.5}}, ["r2", "r3", "r5"]),
    ({"f": {"$lt": 2}}, ["r1", "r4", "r7"]),
    ({"big": 9007199254740993}, ["r9"]),
    ({"big": 9007199254740992}, []),
    ({"big": {"$gt": 9007199254740992}}, ["r9"]),
    ({"nums": {"$ne": 3}}, ALL),
    ({"nums": {"$nin": [3]}}, ALL),
    ({"tags": {"$in": ["a"]}}, []),
    ({"tags": "a"}, []),
    ({"tags": {"$contains": "a"}}, ["r1", "r7"]),
    ({"tags": {"$not_contains": "a"}}, ["r2", "r3", "r4", "r5", "r6", "r8", "r9"]),
    ({"s": {"$contains": "pp"}}, []),
    ({"s": {"$not_contains": "apple"}}, ALL),
    ({"s": {"$ne": "apple"}}, ["r2", "r3", "r4", "r5", "r6", "r7", "r8", "r9"]),
    ({"$and": [{"i": 1}]}, ["r1", "r8"]),
    ({"$or": []}, []),
    ({"$and": []}, ALL),
    ({"#document": {"$contains": "fox"}}, ["r1"]),
    ({"#document": {"$not_contains": "fox"}}, ["r2", "r3", "r4", "r5", "r6", "r7", "r8", "r9"]),
    ({"#document": {"$regex": "^Q"}}, ["r3"]),
    ({"nokey": {"$ne": 1}}, ALL),
    ({"#id": "r1"}, []),
    ({"f": {"$in": [2]}}, ["r2"]),
    ({"i": {"$in": [1.0, 3.0]}}, ["r1", "r3", "r8"]),
    ({"s": {"$in": ["apple", "cherry"]}}, ["r1", "r3"]),
    ({"b": {"$ne": True}}, ["r2", "r3", "r5", "r6", "r7", "r8", "r9"]),
    ({"b": {"$in": [True]}}, ["r1", "r4"]),
    (
        {"$or": [{"$and": [{"i": {"$gt": 0}}, {"b": True}]}, {"tags": {"$contains": "c"}}]},
        ["r1", "r2", "r3"],
    ),
]


@pytest.mark.parametrize(("where", "expected"), WHERE, ids=[repr(w) for w, _ in WHERE])
def test_where_matches_chroma(where: dict[str, Any], expected: list[str]) -> None:
    assert ids(parse_where(where)(Rows())) == expected


DOCUMENT = [
    ({"$contains": ""}, ["r1", "r2", "r3", "r4", "r5", "r6", "r8", "r9"]),
    ({"$contains": "qu"}, ["r1"]),
    ({"$contains": "Qu"}, ["r3"]),
    ({"$contains": "é"}, ["r5"]),
    ({"$regex": "x.y"}, []),
    ({"$regex": "(?s)x.y"}, ["r6"]),
    ({"$regex": "\\$"}, ["r8"]),
    # RE2 (unlike Python's re) agrees with Rust on these: $ is the end of the text only,
    # POSIX classes are ASCII.
    ({"$regex": "y$"}, ["r6"]),
    ({"$regex": "^$"}, ["r4"]),
    ({"$regex": "(?m)^y"}, ["r6"]),
    ({"$regex": "[[:upper:]]"}, ["r3"]),
    ({"$regex": "(a|b)+?b"}, ["r9"]),
    ({"$regex": "[]a]"}, ["r2", "r5", "r9"]),  # a leading ] is text in both
    ({"$regex": "[^\\n]$"}, ["r1", "r2", "r3", "r5", "r6", "r8", "r9"]),
    ({"$regex": "^.{2}$"}, ["r9"]),
    ({"$regex": "é$"}, ["r5"]),
    ({"$regex": "a{0}b"}, ["r3", "r9"]),
    ({"$regex": "(|x)y"}, ["r2", "r6"]),
    ({"$regex": "[[:^alpha:]]"}, ["r1", "r2", "r3", "r5", "r6", "r8"]),
    ({"$not_regex": "[[:space:]]"}, ["r4", "r7", "r8", "r9"]),
    ({"$not_regex": "o"}, ["r4", "r5", "r6", "r7", "r9"]),
    ({"$and": []}, ALL),
    ({"$or": []}, []),
    ({"$and": [{"$contains": "o"}]}, ["r1", "r2", "r3", "r8"]),
]


@pytest.mark.parametrize(("clause", "expected"), DOCUMENT, ids=[repr(c) for c, _ in DOCUMENT])
def test_where_document_matches_chroma(clause: dict[str, Any], expected: list[str]) -> None:
    assert ids(parse_where_document(clause)(Rows())) == expected


@pytest.mark.parametrize(
    "where",
    [
        {"i": {"$in": [1, "x"]}},  # 400 on the primary
        {"i": {"$in": [1, 2.5]}},  # mixed int/float: 400 on the primary
        {"i": {"$in": []}},
        {"s": {"$gt": "a"}},
        {"i": {"$gt": True}},
        {"i": {"$eq": None}},
        {"$not": {"i": 1}},
        {"i": {"$gt": 1, "$lt": 5}},
        {"a": 1, "b": 2},
        {},
        {"#document": "x"},
        {"#embedding": 1},
        {"tags": ["a"]},
        {"i": {"$exists": True}},
    ],
)
def test_invalid_or_unknown_where_is_not_local(where: dict[str, Any]) -> None:
    with pytest.raises(NotLocal):
        parse_where(where)


@pytest.mark.parametrize(
    "pattern",
    [
        "\\p{L}",
        "\\x41",
        "\\A",
        "a{1001}",  # over RE2's repetition limit: the primary answers
        "(?=a)",
        "(?P<x>a)",
        "(a)\\1",
        "{foo}",
        "[a&&b]",
        "(",  # invalid: the primary explains
        # Measured against chroma run 1.5.9: RE2 accepts each of these, and either Rust refuses
        # it (the primary's 400 or 500) or means something else by it.
        "[a[bc]]",  # a nested class in Rust; `[a\[bc]` then `]` in RE2
        "[a[]",  # unclosed in Rust
        "a{01}",  # a{1} in Rust, text in RE2
        "a{4294967295}",  # too big for Rust, text in RE2
        "a{,2}",
        "\\b{start}",  # a word-start assertion in Rust
        "[\\d-z]",  # a range from a class: refused by Rust
        "(?)",
        "(?ii)a",
        "x(?i)*",
        "a{2}*",  # refused by RE2 (so forwarded), taken by Rust
        "[^\\s\\S]",  # empty: Chroma refuses it ("Byte pattern is not allowed")
        "[^[:^alpha:]a-zA-Z]",  # empty too
        "[^é]",  # not empty, but a negated class with non-ASCII characters might be
        "\\w{300}",  # over Rust's compiled size limit (a 500 from the primary); RE2 takes it
        "\\D{1000}",
        "(?:.{100}){100}",  # refused by RE2 (over 1,000 repetitions), and by our size bound
        "(" * 50 + "a" + ")" * 50,  # Rust refuses 250 levels (62 groups at worst); RE2 1,000
    ],
)
def test_regexes_that_may_differ_are_not_local(pattern: str) -> None:
    with pytest.raises(NotLocal):
        document_regex(pattern)


@pytest.mark.parametrize(
    "pattern",
    ["\\w{100}", "\\d{3}-\\d{4}", ".{1000}", "[^a]{1000}", "a{1000}b{1000}", "(?:a{10}){100}",
     "(" * 49 + "a" + ")" * 49, "[^\\d]", "[^[:alpha:]]", "[[:alpha:]-]", "a*?b+?c??d{2}?"],
)  # fmt: skip
def test_regexes_rust_compiles_are_local(pattern: str) -> None:
    """Within Rust's limits with a margin (each accepted by chroma run 1.5.9)."""
    document_regex(pattern)


def test_class_escapes_need_plain_ascii_documents() -> None:
    clause = {"$regex": "\\bdog\\b"}
    with pytest.raises(NotLocal):  # "naïve café": Rust's \b is Unicode, RE2's ASCII
        parse_where_document(clause)(Rows())
    ascii_rows = Rows(documents=["lazy dog", "hotdog", *([None] * 7)])
    assert ascii_rows.documents_plain_ascii is True
    assert ids(parse_where_document(clause)(ascii_rows)) == ["r1"]
