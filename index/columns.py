"""Metadata laid out in columns, so that `where` filters evaluate with numpy, not row by row.

Each metadata key becomes a :class:`Column`: a per-row kind code, one typed array per scalar
kind (strings as integer codes), and an inverted index of array values for ``$contains``.
Semantics follow Chroma 1.5.9 as measured (chroma-wire.md section 7): str, int, float and bool
never match each other, except int and float, which compare numerically and exactly; array
values are reachable only through ``$contains``, which is type-strict (an int array does not
contain 1.0).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

Mask = npt.NDArray[np.bool_]

# Kind codes of a value in a row.
ABSENT, STR, INT, FLOAT, BOOL, ARRAY = 0, 1, 2, 3, 4, 5
_I64_MIN, _I64_MAX = -(1 << 63), (1 << 63) - 1


def scalar_kind(value: object) -> int:
    """Kind code of a filter operand or a stored scalar (bool before int: bool is an int)."""
    if isinstance(value, bool):
        return BOOL
    if isinstance(value, int):
        return INT
    if isinstance(value, float):
        return FLOAT
    if isinstance(value, str):
        return STR
    raise TypeError(value)


@dataclass(slots=True)
class Column:
    """One metadata key over all rows."""

    n: int
    kind: npt.NDArray[np.int8] = field(init=False)
    str_codes: npt.NDArray[np.int32] = field(init=False)
    str_index: dict[str, int] = field(default_factory=dict)
    ints: npt.NDArray[np.int64] = field(init=False)
    floats: npt.NDArray[np.float64] = field(init=False)
    bools: Mask = field(init=False)
    # (kind of the element, value) -> rows whose array holds it.
    contains: dict[tuple[int, Any], list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.kind = np.zeros(self.n, np.int8)
        self.str_codes = np.full(self.n, -1, np.int32)
        self.ints = np.zeros(self.n, np.int64)
        self.floats = np.zeros(self.n, np.float64)
        self.bools = np.zeros(self.n, np.bool_)

    def set(self, row: int, value: Any) -> None:
        if isinstance(value, list):
            self.kind[row] = ARRAY
            for item in value:
                self.contains.setdefault((scalar_kind(item), item), []).append(row)
            return
        kind = scalar_kind(value)
        self.kind[row] = kind
        if kind == STR:
            self.str_codes[row] = self.str_index.setdefault(value, len(self.str_index))
        elif kind == INT:
            self.ints[row] = value
        elif kind == FLOAT:
            self.floats[row] = value
        else:
            self.bools[row] = value

    # --- predicates (each returns a row mask) -------------------------------------------------

    def eq(self, value: object) -> Mask:
        if isinstance(value, str):
            code = self.str_index.get(value)
            if code is None:
                return np.zeros(self.n, np.bool_)
            same: Mask = self.str_codes == code
            return same
        if isinstance(value, bool):
            both: Mask = (self.kind == BOOL) & (self.bools == value)
            return both
        assert isinstance(value, int | float)
        return self.compare("eq", value)

    def compare(self, op: str, value: float) -> Mask:
        """Numeric comparison with int and float rows, exact for any int64 and float64."""
        on_ints = (self.kind == INT) & _int_compare(self.ints, op, value)
        on_floats = (self.kind == FLOAT) & _float_compare(self.floats, op, value)
        result: Mask = on_ints | on_floats
        return result

    def isin(self, values: list[Any]) -> Mask:
        out = np.zeros(self.n, np.bool_)
        for value in values:
            out |= self.eq(value)
        return out

    def array_contains(self, value: object) -> Mask:
        out = np.zeros(self.n, np.bool_)
        rows = self.contains.get((scalar_kind(value), value))
        if rows:
            out[rows] = True
        return out


_OPS = {
    "eq": np.equal,
    "gt": np.greater,
    "gte": np.greater_equal,
    "lt": np.less,
    "lte": np.less_equal,
}


_PY_OPS = {
    "eq": operator.eq,
    "gt": operator.gt,
    "gte": operator.ge,
    "lt": operator.lt,
    "lte": operator.le,
}


def _int_compare(ints: npt.NDArray[np.int64], op: str, value: float) -> Mask:
    """Compare int64 values with an int or float operand exactly (no rounding through float)."""
    if isinstance(value, float):
        if not value.is_integer():
            if op == "eq":
                return np.zeros(len(ints), np.bool_)
            # x > 1.5 <=> x >= 2; x < 1.5 <=> x <= 1 for integers.
            op, value = (
                ("gte", math.ceil(value)) if op in ("gt", "gte") else ("lte", math.floor(value))
            )
        else:
            value = int(value)
    if value < _I64_MIN or value > _I64_MAX:  # beyond int64: every stored int is on one side
        above = value > _I64_MAX
        holds = {"eq": False, "gt": not above, "gte": not above, "lt": above, "lte": above}[op]
        return np.full(len(ints), holds, np.bool_)
    result: Mask = _OPS[op](ints, np.int64(value))
    return result


def _float_compare(floats: npt.NDArray[np.float64], op: str, value: float) -> Mask:
    if isinstance(value, int) and float(value) != value:
        # An int that float64 cannot hold exactly: Python compares int and float exactly.
        test = _PY_OPS[op]
        return np.fromiter((test(x, value) for x in floats.tolist()), np.bool_, len(floats))
    result: Mask = _OPS[op](floats, float(value))
    return result


class Columns:
    """All metadata keys of a replica; a key no row has behaves as an all-absent column."""

    def __init__(self, metadatas: list[dict[str, Any] | None]) -> None:
        self.n = len(metadatas)
        self._columns: dict[str, Column] = {}
        for row, meta in enumerate(metadatas):
            if meta:
                for key, value in meta.items():
                    column = self._columns.get(key)
                    if column is None:
                        column = self._columns[key] = Column(self.n)
                    column.set(row, value)
        self._empty = Column(self.n)

    def __getitem__(self, key: str) -> Column:
        return self._columns.get(key, self._empty)

    def __iter__(self) -> Iterator[Column]:
        return iter(list(self._columns.values()))
