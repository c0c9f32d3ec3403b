from __future__ import annotations

from multidict import CIMultiDict

from proxy.primary.upstream import request_headers, response_headers


def test_hop_by_hop_request_headers_are_dropped() -> None:
    incoming = CIMultiDict(
        [
            ("Host", "proxy:8000"),
            ("Connection", "keep-alive, X-Hop"),
            ("Keep-Alive", "timeout=5"),
            ("X-Hop", "only for this hop"),
            ("TE", "trailers"),
            ("Upgrade", "h2c"),
            ("Proxy-Authorization", "Basic abc"),
            ("Expect", "100-continue"),
            ("Transfer-Encoding", "chunked"),
            ("Content-Type", "application/json"),
            ("Content-Length", "12"),
            ("x-chroma-token", "tok"),
            ("Authorization", "Bearer tok"),
            ("X-Multi", "a"),
            ("X-Multi", "b"),
        ]
    )
    out = request_headers(incoming)
    assert list(out.items()) == [
        ("Content-Type", "application/json"),
        ("Content-Length", "12"),
        ("x-chroma-token", "tok"),
        ("Authorization", "Bearer tok"),
        ("X-Multi", "a"),
        ("X-Multi", "b"),
    ]


def test_response_keeps_trace_id_and_drops_framing() -> None:
    upstream = CIMultiDict(
        [
            ("content-type", "application/json"),
            ("content-length", "44"),
            ("chroma-trace-id", "00000000000000000000000000000000"),
            ("transfer-encoding", "chunked"),
            ("connection", "close"),
            ("date", "Wed, 25 Nov 2026 19:09:53 GMT"),
        ]
    )
    assert list(response_headers(upstream).items()) == [
        ("content-type", "application/json"),
        ("chroma-trace-id", "00000000000000000000000000000000"),
        ("date", "Wed, 25 Nov 2026 19:09:53 GMT"),
    ]
