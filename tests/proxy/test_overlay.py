"""What a write's body means to the export-mode overlay (proxy/replica/overlay.py plan_write): the
log rows it replays, and the bodies it refuses to guess about (the write then falls back to
rebuilds)."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import pytest

from index.errors import NotLocal
from index.live import ADD, DELETE, DOCUMENT_KEY, UPDATE, UPSERT, URI_KEY
from proxy.replica.overlay import plan_write


def _plan(op: str, body: dict[str, Any]) -> Any:
    return plan_write(op, body)


def test_base64_and_number_embeddings_decode_to_the_same_float32() -> None:
    vector = np.array([1.0, -2.5, 0.1], np.float32)
    encoded = base64.b64encode(vector.astype("<f4").tobytes()).decode()
    as_text = _plan("add", {"ids": ["a"], "embeddings": [encoded]}).ops[0]
    as_numbers = _plan("add", {"ids": ["a"], "embeddings": [vector.tolist()]}).ops[0]
    assert as_text.vector.tobytes() == as_numbers.vector.tobytes() == vector.tobytes()


def test_records_become_log_rows() -> None:
    body = {"ids": ["a", "b"], "embeddings": [[1.0], [2.0]], "documents": ["d", None],
            "metadatas": [{"k": 1, "gone": None}, None], "uris": None}  # fmt: skip
    planned = _plan("upsert", body)
    assert planned.ids == frozenset({"a", "b"})
    a, b = planned.ops
    assert (a.kind, a.id, b.kind) == (UPSERT, "a", UPSERT)
    assert a.metadata == {"k": 1, "gone": None, DOCUMENT_KEY: "d", URI_KEY: None}
    assert b.metadata == {DOCUMENT_KEY: None, URI_KEY: None}


def test_a_metadata_only_update_has_no_vector() -> None:
    (op,) = _plan("update", {"ids": ["a"], "embeddings": None, "metadatas": [{"k": 2}]}).ops
    assert op.kind == UPDATE and op.vector is None


def test_an_add_drops_empty_lists_as_the_primary_does() -> None:
    body = {"ids": ["a"], "embeddings": [[1.0]], "metadatas": [{"l": [], "k": 1}]}
    (op,) = _plan("add", body).ops
    assert op.kind == ADD and op.metadata["k"] == 1 and "l" not in op.metadata


def test_deletes_by_ids_and_by_filter() -> None:
    by_ids = _plan("delete", {"ids": ["a", "b"], "where": None, "where_document": None})
    assert [(o.kind, o.id) for o in by_ids.ops] == [(DELETE, "a"), (DELETE, "b")]
    assert _plan("delete", {}).ops == [] and _plan("delete", {}).ids == frozenset()
    by_filter = _plan("delete", {"ids": ["a"], "where": {"k": 1}})
    assert by_filter.ids is None and by_filter.delete_ids == ["a"]
    assert len(by_filter.delete_filters) == 1


@pytest.mark.parametrize(
    ("op", "body"),
    [
        ("add", {"ids": ["a"], "embeddings": None}),  # an insert without a vector
        ("upsert", {"ids": ["a", "a"], "embeddings": [[1.0], [1.0]]}),  # one id twice
        ("add", {"ids": [""], "embeddings": [[1.0]]}),
        ("add", {"ids": ["a"], "embeddings": ["not base64!"]}),
        ("add", {"ids": ["a"], "embeddings": [[True]]}),
        ("add", {"ids": ["a", "b"], "embeddings": [[1.0]]}),  # lengths differ
        ("add", {"ids": ["a"], "embeddings": [[1.0]], "metadatas": [{"n": {"x": 1}}]}),
        ("add", {"ids": ["a"], "embeddings": [[1.0]], "metadatas": [{"chroma:document": "x"}]}),
        ("add", {"ids": ["a"], "embeddings": [[1.0]], "metadatas": [{"l": [1, "x"]}]}),
        ("update", {"ids": ["a"], "metadatas": [{"l": []}]}),  # what [] does here: unknown
        ("add", {"ids": ["a"], "embeddings": [[1.0]], "extra": 1}),  # a field not known
        ("delete", {"where": {"k": 1}, "limit": 1}),  # which rows a limit picks: not known
        ("delete", {"where": {"$bogus": 1}}),
        ("fork", {"new_name": "x"}),
    ],
)
def test_bodies_it_does_not_guess_about(op: str, body: dict[str, Any]) -> None:
    with pytest.raises(NotLocal):
        _plan(op, body)


def test_a_body_that_is_not_an_object_is_refused() -> None:
    bodies: tuple[object, ...] = (None, [], "x")
    for body in bodies:
        with pytest.raises(NotLocal):
            plan_write("add", body)
