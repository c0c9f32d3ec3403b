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
# Patterns are answered locally only where RE2 and Rust are known to agree, and where Rust
# accepts what RE2 accepts: each corner below was measured against `chroma run` 1.5.9. ------

_SAFE_ESCAPES = frozenset(".\\-[](){}*+?|^$/ntr")
# RE2's \d \w \s \b are ASCII, Rust's Unicode: they agree on plain ASCII documents.
_PERL_CLASSES = frozenset("dDwWsS")
_INLINE = re.compile(r"\(\?([ims]+\)|[ims]*:)")  # Rust refuses `(?)`; RE2 takes it
# RE2 reads `{01}` and `{4294967295}` as literal text, Rust as repetitions (the second an error)
_COUNTED = re.compile(r"\{(0|[1-9][0-9]{0,3})(,(0|[1-9][0-9]{0,3})?)?\}")
_POSIX = re.compile(r"\[:(\^?)[a-z]+:\]")  # the only `[` RE2 and Rust both allow in a class
_MAX_REPEAT = 1000  # RE2 refuses more; Rust takes it: forwarded
# Rust refuses patterns nested deeper than 250 (group, alternation, concatenation and
# repetition count one each, so at most 4 per group); RE2 allows 1,000.
_MAX_GROUP_DEPTH = 50
# Rust refuses a pattern whose compiled program exceeds 10 MiB; RE2's ASCII classes are far
# smaller, so RE2 takes e.g. \w{300} or \D{1000}, which the primary answers with a 500. The cost
# below bounds Rust's size from above, with a margin of at least 2 on each kind of atom as
# measured (Rust allows 209 copies of \w, 822 of \D, 10,400 of `.`, over 200,000 of `a`).
_MAX_COST = 10_000
_ATOM_COST = 4
_PERL_CLASS_COST = 100


class _Searcher(Protocol):
    def search(self, text: str) -> object: ...


class DocumentRegex:
    __slots__ = ("needs_plain_ascii", "regex")

    def __init__(self, regex: _Searcher, needs_plain_ascii: bool) -> None:
        self.regex = regex  # .search(text) is None or a match
        self.needs_plain_ascii = needs_plain_ascii


def _re2_options() -> Any:
    options = re2.Options()
    options.log_errors = False  # a pattern RE2 refuses is forwarded, not logged to stderr
    options.never_capture = True  # only whether a document matches is asked
    return options


_OPTIONS = _re2_options()


def document_regex(pattern: str) -> DocumentRegex:
    """Compile ``pattern`` with RE2 if it means there what it means to Rust's `regex`; else
    NotLocal (the primary answers, including its own error for an invalid pattern).

    Local: literals, `.`, classes (POSIX ones: ASCII in both), `^` and `$` (end of text only,
    unlike Python's `$`), alternation, groups and non-capturing groups, greedy and lazy
    quantifiers, counted repetition up to 1,000, the inline flags i, m, s; \\d \\w \\s \\b
    and (?i) on plain ASCII documents only. Forwarded: escapes other than punctuation and
    \\n \\t \\r (\\p{..}, \\x.., \\A, \\z, \\Q..\\E), look-arounds and back-references,
    named groups, other flags, nested classes and class set operations, stacked quantifiers,
    a `{` that is not a repetition, negated classes that might be empty, deep nesting and
    patterns Rust may find too large to compile (see _MAX_COST)."""
    scan = _RegexScan(pattern)
    scan.run()
    try:
        return DocumentRegex(re2.compile(pattern, _OPTIONS), scan.needs_ascii)
    except re2.error as exc:  # the primary will explain in its own words
        raise NotLocal(f"regex does not compile: {exc}") from None


class _RegexScan:
    """One pass over a pattern: raises NotLocal at the first token RE2 and Rust may read
    differently, and adds up an upper bound of the size Rust compiles the pattern to."""

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        self.i = 0
        self.needs_ascii = False
        # Per open group, the cost so far; `last` is the cost of the atom a quantifier would
        # repeat (None: nothing to repeat, or it was just repeated).
        self.costs = [0]
        self.last: int | None = None

    def run(self) -> None:
        while self.i < len(self.pattern):
            self._token(self.pattern[self.i])
        if sum(self.costs) > _MAX_COST:
            raise NotLocal("regex may exceed the primary's compiled size limit")

    def _token(self, ch: str) -> None:
        if ch in "*+?{":
            return self._quantifier(ch)
        if ch == "(":
            return self._open()
        if ch == ")":
            return self._close()
        if ch == "|":
            self._advance(1, _ATOM_COST, repeatable=False)
        elif ch == "\\":
            self._advance(2, self._escape(self.pattern[self.i + 1 : self.i + 2]))
        elif ch == "[":
            self._class()
        else:
            self._advance(1, _ATOM_COST)

    def _advance(self, width: int, cost: int, repeatable: bool = True) -> None:
        self.i += width
        self.costs[-1] += cost
        self.last = cost if repeatable else None

    def _escape(self, nxt: str) -> int:
        if nxt in _PERL_CLASSES or nxt in ("b", "B"):
            self.needs_ascii = True
            return _PERL_CLASS_COST if nxt in _PERL_CLASSES else _ATOM_COST
        if nxt and nxt in _SAFE_ESCAPES:
            return _ATOM_COST
        raise NotLocal(f"regex escape \\{nxt} is not replicated")

    def _quantifier(self, ch: str) -> None:
        if self.last is None:  # `x(?i)*` is an error in Rust, not in RE2; `a{2}*` the reverse
            raise NotLocal("a quantifier must follow an atom to be replicated")
        times, width = 1, 1
        if ch == "{":
            times, width = self._counted()
        if self.pattern.startswith("?", self.i + width):  # lazy: the same set of matches
            width += 1
        self.costs[-1] += self.last * (times - 1)
        self.i += width
        self.last = None

    def _counted(self) -> tuple[int, int]:
        """`{n}`, `{n,}`, `{n,m}` → (copies Rust compiles, width)."""
        match = _COUNTED.match(self.pattern, self.i)
        if match is None:  # RE2 reads a stray `{` as text, Rust as an error (or \b{start})
            raise NotLocal("a literal { is not replicated")
        low, comma, high = match.group(1), match.group(2), match.group(3)
        copies = int(high) if high else int(low) + (1 if comma else 0)
        if max(copies, int(low)) > _MAX_REPEAT:
            raise NotLocal("repetitions over 1,000 are not replicated")
        return max(copies, 1), match.end() - self.i

    def _open(self) -> None:
        if self.pattern.startswith("(?", self.i):
            match = _INLINE.match(self.pattern, self.i)
            if match is None:  # look-arounds, named groups, other flags
                raise NotLocal("regex group syntax is not replicated")
            flags = match.group(1)[:-1]
            if len(set(flags)) < len(flags):  # `(?ii)`: an error in Rust, not in RE2
                raise NotLocal("repeated regex flags are not replicated")
            self.needs_ascii = self.needs_ascii or "i" in flags
            self.i = match.end()
            if match.group(1).endswith(")"):  # flags alone: nothing to repeat
                self.last = None
                return
        else:
            self.i += 1
        self.costs.append(_ATOM_COST)
        self.last = None
        if len(self.costs) > _MAX_GROUP_DEPTH:
            raise NotLocal("regex nesting is too deep to replicate")

    def _close(self) -> None:
        if len(self.costs) == 1:
            raise NotLocal("unbalanced )")  # an error on the primary
        self.i += 1
        group = self.costs.pop()
        self.costs[-1] += group
        self.last = group

    def _class(self) -> None:
        """A bracketed class `[...]`. Nested classes and set operations (`&&`, `--`, `~~`) are
        Rust only (RE2 reads `[a[b]]` as `[a\\[b]` then `]`). A class Rust finds empty makes
        Chroma refuse the pattern (400, "Byte pattern is not allowed") where RE2 would just
        not match, so a negated class may hold ASCII characters and at most one positive
        class (Perl or POSIX), which leaves it some non-ASCII character to match."""
        start = self.i
        j = start + 1 + self.pattern.startswith("^", start + 1)
        negated = j > start + 1
        j += self.pattern.startswith("]", j)  # a leading ] is text in both
        members = _ClassMembers()
        while j < len(self.pattern) and self.pattern[j] != "]":
            j = members.add(self.pattern, j)
        if j >= len(self.pattern):
            raise NotLocal("unclosed class")  # an error on the primary
        if negated and (members.classes > 1 or not members.ascii_only):
            raise NotLocal("a negated class that may be empty is not replicated")
        self.needs_ascii = self.needs_ascii or members.perl > 0
        cost = _ATOM_COST + (j - start) + _PERL_CLASS_COST * members.perl
        self._advance(j + 1 - start, cost)


class _ClassMembers:
    """What a bracketed class holds, read one member at a time."""

    def __init__(self) -> None:
        self.classes = 0  # Perl and POSIX classes; a negated POSIX class counts twice
        self.perl = 0
        self.ascii_only = True

    def add(self, pattern: str, j: int) -> int:
        """Read the member at ``pattern[j]``; return where the next one starts."""
        if pattern.startswith(("&&", "--", "~~"), j):
            raise NotLocal("class set operations are not replicated")
        if pattern[j] == "\\":
            nxt = pattern[j + 1 : j + 2]
            if nxt in _PERL_CLASSES:
                self.classes, self.perl = self.classes + 1, self.perl + 1
                return _after_class(pattern, j + 2)
            if not nxt or nxt not in _SAFE_ESCAPES:
                raise NotLocal(f"regex escape \\{nxt} in a class is not replicated")
            return j + 2
        if pattern[j] == "[":
            posix = _POSIX.match(pattern, j)
            if posix is None:
                raise NotLocal("nested classes are not replicated")
            self.classes += 2 if posix.group(1) else 1
            return _after_class(pattern, posix.end())
        self.ascii_only = self.ascii_only and pattern[j].isascii()
        return j + 1


def _after_class(pattern: str, end: int) -> int:
    # `[\d-z]`: Rust refuses a range from a class, RE2 reads the `-` as text
    if pattern.startswith("-", end) and not pattern.startswith("-]", end):
        raise NotLocal("a range next to a class is not replicated")
    return end


def plain_ascii(documents: list[str | None]) -> bool:
    """True if every document is printable ASCII plus tab, newline and carriage return, where
    RE2 and Rust agree on \\w, \\d, \\s, \\b and case folding."""
    return all(doc is None or (doc.isascii() and not _ODD_ASCII.search(doc)) for doc in documents)


_ODD_ASCII = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
