"""The streamed write limits (proxy/access/limits.py StreamedLimits) refuse exactly what the
whole-body check refuses, wherever the chunks are cut."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.access.limits import Limits, StreamedLimits
from proxy.errors import ProxyError

LIMITS = Limits(ids=5, n_results=10, query_vectors=10, where_depth=8, where_nodes=50,
                document_bytes=12, metadata_bytes=40)  # fmt: skip

scalars = st.one_of(st.none(), st.booleans(), st.integers(-9, 9), st.text(max_size=12))
metadata = st.one_of(
    st.none(),
    st.dictionaries(st.text(max_size=6), st.one_of(scalars, st.lists(scalars, max_size=3)),
                    max_size=4),
)  # fmt: skip
bodies = st.fixed_dictionaries(
    {},
    optional={
        "ids": st.lists(st.text(max_size=4), max_size=7),
        "documents": st.lists(st.one_of(st.none(), st.text(max_size=14)), max_size=4),
        "metadatas": st.lists(metadata, max_size=4),
        "embeddings": st.lists(st.text("AQ=", max_size=8), max_size=3),
    },
)


def _refusal(check: Any) -> str | None:
    try:
        check()
    except ProxyError as exc:
        return type(exc).__name__
    return None


@settings(max_examples=300, deadline=None)
@given(body=bodies, cuts=st.lists(st.integers(1, 400), max_size=6))
def test_streamed_checks_refuse_what_the_whole_body_check_refuses(
    body: dict[str, Any], cuts: list[int]
) -> None:
    raw = orjson.dumps(body)
    streamed = StreamedLimits(LIMITS)

    def feed() -> None:
        start = 0
        for cut in [*sorted(cuts), len(raw)]:
            streamed.feed(raw[start:cut])
            start = max(start, cut)

    # Refused alike; which error may differ when a body passes two limits (the stream meets
    # them in the body's order, the whole check in its own).
    assert (_refusal(feed) is None) == (_refusal(lambda: LIMITS.check(body)) is None)


@pytest.mark.parametrize("raw", [b"not json", b'{"ids": [1, 2', b"[[[", b'{"ids": "x"}'])
def test_what_the_parser_cannot_follow_is_left_to_the_primary(raw: bytes) -> None:
    StreamedLimits(LIMITS).feed(raw)
