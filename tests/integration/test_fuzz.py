"""Fuzz the proxy with schemathesis over Chroma's own OpenAPI document (/openapi.json).

Every generated request (schema examples, then valid and invalid ones per operation) goes to
the proxy and then, the same, straight to the primary; the two answers are compared:

* the proxy never answers a 5xx of its own, nor drops the connection, where the primary
  answered < 500: that would be the proxy's fault;
* where the primary drops the connection (a handler panic: GET /api/v2/collections/{crn},
  chroma-wire.md 14.9, and collection metadata with an array value on create or modify) the
  proxy answers a clean 502 in Chroma's error format ("dropped->502"; the summary names one
  such request per operation);
* where the primary answers a 5xx the proxy passes a 5xx on ("passed on");
* the proxy does not answer from a replica (or its cache) what the primary refuses;
* an error answer (>= 400) of the proxy is Chroma's error JSON, unless the primary's own
  answer was not JSON either (its plain-text 4xx pass through);
* an answer of the proxy's never carries a Python traceback.

Answers are not otherwise compared: every write goes to the primary twice (once through the
proxy), so the two can see different data; test_replica_parity.py compares contents.

Schemathesis' own checks (not_a_server_error and the rest) are not used: a 5xx passed on from
the primary is correct here, and which side answered is only known by comparing the two.

The primary is this module's own `chroma run --path`: the fuzz creates and deletes tenants,
databases and collections under generated names, which must not reach the session's shared
primary (chroma-wire.md 14.2: rows of a deleted collection leak into others). `--path` cannot
enable allow_reset, so POST /api/v2/reset stays in the fuzz and cannot wipe the seed; the
fixture checks that the primary refuses it.

It runs twice: against an open proxy, and against one with a tokens file (every case carries
a write token over all tenants), so the auth stage sees the same malformed input.

CI runs a small fixed-seed sample (about 1,000 requests); FUZZ_EXAMPLES=300 (examples per
operation and mode) makes a long run by hand (about 47,000 requests, 10 minutes).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import Case, GenerationMode
from schemathesis.core.result import Ok

from proxy.routes import RouteClass, classify
from tests.helpers import ChromaServer, ProxyProcess, wait_until

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "6"))
T, D = "default_tenant", "default_database"
API_D = f"/api/v2/tenants/{T}/databases/{D}"
SEED_NAME = "fuzz-seed"
ADMIN = "fuzz-test-admin-token"
# Longer than the proxy's read_timeout_s (60 s): a primary that hangs gets the proxy's 504.
TIMEOUT_S = 90.0
# Path parameters not pinned to the seed where the operation deletes what they name: the
# seed must live through the whole run.
UNPINNED = {"delete_database": {"database"}, "delete_collection": {"collection_id"}}
# The document calls GET .../collections/{collection_id}'s parameter an id; it is the name.
BY_NAME = {"get_collection": {"collection_id": SEED_NAME}}
# Traces of a Python stack trace in an answer.
TRACEBACK = (b"Traceback (most recent call last)", b'File "')
LOCAL = ("replica", "cache")  # X-Proxy-Source of an answer the proxy made from a replica


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    source: str  # X-Proxy-Source: who answered (the primary's own answers have none)


DROPPED = "dropped"  # the connection closed without an answer
TIMED_OUT = "timed out"
Outcome = Answer | str


@pytest.fixture(scope="module")
def primary(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChromaServer]:
    server = ChromaServer(tmp_path_factory.mktemp("fuzz-chroma") / "data").start()
    # The fuzz sends POST /api/v2/reset: it must not be able to wipe anything.
    assert httpx.post(server.url + "/api/v2/reset", timeout=TIMEOUT_S).status_code >= 400
    yield server
    server.stop()


@pytest.fixture(scope="module")
def seed(primary: ChromaServer) -> dict[str, str]:
    """A collection with a few rows, so pinned path parameters name things that exist."""
    with httpx.Client(base_url=primary.url, timeout=TIMEOUT_S) as client:
        made = client.post(f"{API_D}/collections", json={"name": SEED_NAME})
        cid: str = made.json()["id"]
        rows = {
            "ids": [f"r{i}" for i in range(12)],
            "embeddings": [[float(i), float(i % 3), 1.0] for i in range(12)],
            "documents": [f"row {i} about {('alpha', 'beta')[i % 2]}" for i in range(12)],
            "metadatas": [{"i": i, "cat": f"c{i % 3}", "tags": [f"t{i % 2}"]} for i in range(12)],
        }
        assert client.post(f"{API_D}/collections/{cid}/add", json=rows).status_code == 201
    return {"tenant": T, "tenant_name": T, "database": D, "collection_id": cid,
            "crn": f"{T}:{D}:{SEED_NAME}"}  # fmt: skip


@pytest.fixture(scope="module")
def fuzz_proxy(
    primary: ChromaServer, seed: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    """Default settings (replicas of default_tenant/default_database, session reads), with
    the seed's replica serving before the fuzz starts so reads take the local path."""
    log_dir = tmp_path_factory.mktemp("fuzz-proxy")
    proc = ProxyProcess("--primary", primary.url, "--rebuild-debounce-s", "0.2",
                        "--admin-token", ADMIN, "--data-dir", str(log_dir / "data"),
                        log_dir=log_dir)  # fmt: skip
    count = f"{proc.url}{API_D}/collections/{seed['collection_id']}/count"

    def served_locally() -> bool:
        source = httpx.get(count, timeout=TIMEOUT_S).headers.get("X-Proxy-Source")
        return source in LOCAL

    wait_until(served_locally, 60, "the seed's replica")
    yield proc
    assert proc.stop() == 0, proc.logs()


# The secured proxy's token: role write over every tenant and database, so the auth stage's
# parsing (collection ids in every spelling, owner lookups) runs on every generated path and
# most requests still go on to the primary (tenants, reset and the like are the admin's: 403).
FUZZER = "fuzz-test-write-token-" + "x" * 16


@pytest.fixture(scope="module")
def secured_fuzz_proxy(
    primary: ChromaServer, seed: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    """The same with a tokens file: every case carries the write token."""
    log_dir = tmp_path_factory.mktemp("fuzz-secured")
    digest = hashlib.sha256(FUZZER.encode()).hexdigest()
    tokens = log_dir / "tokens.toml"
    tokens.write_text(f'[tokens.fuzzer]\nsha256 = "{digest}"\nrole = "write"\n'
                      'scopes = ["*/*"]\n')  # fmt: skip
    proc = ProxyProcess("--primary", primary.url, "--rebuild-debounce-s", "0.2",
                        "--tokens-file", str(tokens), "--data-dir", str(log_dir / "data"),
                        log_dir=log_dir)  # fmt: skip
    yield proc
    assert proc.stop() == 0, proc.logs()


def send(case: Case[Any], base_url: str, headers: dict[str, str]) -> Outcome | None:
    """The case's request to ``base_url`` on a connection of its own; None if the request
    cannot be sent at all (a header value no HTTP library puts on the wire, say)."""
    with requests.Session() as session:
        try:
            resp = case.call(base_url=base_url, session=session, headers=headers or None,
                             timeout=TIMEOUT_S, allow_redirects=False)  # fmt: skip
        except requests.Timeout:
            return TIMED_OUT
        except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError):
            return DROPPED
        except (requests.exceptions.InvalidHeader, requests.exceptions.InvalidURL,
                UnicodeError):  # fmt: skip
            return None
    source = resp.headers.get("x-proxy-source", ["-"])[0]
    return Answer(resp.status_code, resp.content, source)


def is_json(body: bytes) -> bool:
    try:
        orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return True


def chroma_error(body: bytes) -> dict[str, str] | None:
    """The body if it is Chroma's error format, {"error": NAME, "message": TEXT}."""
    try:
        found = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(found, dict):
        return None
    error, message = found.get("error"), found.get("message")
    if isinstance(error, str) and isinstance(message, str):
        return {"error": error, "message": message}
    return None


def own(answer: Answer) -> bool:
    """An answer the proxy made itself rather than passed on: so its source says, or its
    message (an error raised after the primary's headers came keeps the source "primary")."""
    error = chroma_error(answer.body)
    return answer.source == "proxy" or (error is not None and
                                        error["message"].startswith("replica-proxy:"))  # fmt: skip


def has_traceback(outcome: Outcome) -> bool:
    return isinstance(outcome, Answer) and any(t in outcome.body for t in TRACEBACK)


def judge(proxy: Outcome, primary: Outcome) -> tuple[str, str | None]:
    """(what was seen, why it is the proxy's fault or None)."""
    if has_traceback(proxy) and not has_traceback(primary):  # (not an echo of the input)
        return "traceback", "the proxy's answer carries a Python traceback"
    if primary == DROPPED:
        if proxy == DROPPED:
            return "dropped->dropped", "the primary dropped the connection and so did the proxy"
        assert isinstance(proxy, Answer)
        if proxy.status == 502 and own(proxy) and chroma_error(proxy.body) is not None:
            return "dropped->502", None
        if 400 <= proxy.status < 500 and proxy.source == "proxy" and chroma_error(proxy.body):
            return "refused by the proxy (primary dropped)", None  # never sent: access control
        return f"dropped->{proxy.status}", "the primary dropped the connection: want a clean 502"
    if primary == TIMED_OUT and isinstance(proxy, Answer) and proxy.status == 504 and own(proxy):
        return "timed out->504", None  # the proxy gave up first (read_timeout_s)
    if primary == TIMED_OUT or proxy == TIMED_OUT:
        return "timed out", f"no answer in {TIMEOUT_S:.0f}s (proxy {proxy}, primary {primary})"
    assert isinstance(primary, Answer)
    if proxy == DROPPED:
        return "proxy dropped", f"the proxy dropped the connection; the primary: {primary.status}"
    assert isinstance(proxy, Answer)
    if proxy.status >= 500:
        if primary.status >= 500 and not own(proxy):
            return "passed on", None
        return (
            f"own {proxy.status}",
            f"the proxy answered {proxy.status}; the primary {primary.status}",
        )
    if proxy.status >= 400 and chroma_error(proxy.body) is None and is_json(primary.body):
        return "bad error body", "the proxy's error is not Chroma's JSON error format"
    if primary.status >= 500:
        if own(proxy) and proxy.status >= 400:
            return "refused by the proxy (primary 5xx)", None  # its own limits: never sent on
        return f"{primary.status}->{proxy.status}", "the primary answered 5xx, the proxy did not"
    if proxy.source in LOCAL and primary.status >= 400:
        return f"local {proxy.status}", f"answered locally what the primary refuses: {primary}"
    label = f"{proxy.status // 100}xx {proxy.source}"
    if own(proxy):  # refused by the proxy itself (its limits): and the primary?
        label += f" (primary {primary.status // 100}xx)"
    if proxy.status >= 400 and not is_json(proxy.body):
        label += " (not JSON, as the primary's)"
    return label, None


@dataclass
class Tally:
    seen: Counter[tuple[str, str]]  # (operation, what was seen) -> how often
    failures: list[str]
    headers: dict[str, str]  # sent with every case, to the proxy and the primary alike
    requests: int = 0
    drops: dict[str, str] = field(default_factory=dict)  # operation -> a request it dropped

    def check(self, label: str, case: Case[Any], proxy_url: str, primary_url: str) -> None:
        """One case: to the proxy, then the same to the primary, and judged."""
        proxy = send(case, proxy_url, self.headers)
        if proxy is None:
            self.seen[(label, "unsendable")] += 1
            return
        primary = send(case, primary_url, self.headers)  # (Chroma ignores auth headers)
        assert primary is not None  # the same request was sendable a moment ago
        self.requests += 2
        seen, fault = judge(proxy, primary)
        self.seen[(label, seen)] += 1
        if seen == "dropped->502" and label not in self.drops:
            self.drops[label] = case.as_curl_command(base_url=primary_url)
        if fault is not None:
            curl = case.as_curl_command(base_url=proxy_url)
            self.failures.append(f"{label}: {fault}\n  {curl}\n  proxy: {proxy!r:.400}"
                                 f"\n  primary: {primary!r:.400}")  # fmt: skip


def each_case(strategy: st.SearchStrategy[Case[Any]], examples: int) -> Iterator[Case[Any]]:
    """Up to ``examples`` cases from ``strategy``, the same ones on every run (fixed seed, no
    example database), without shrinking: a case that finds a fault is recorded, not raised.
    None at all if nothing of the operation can be made invalid (it has no parameters)."""
    cases: list[Case[Any]] = []

    @settings(max_examples=examples, derandomize=True, database=None, deadline=None,
              phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(strategy)
    def collect(case: Case[Any]) -> None:
        cases.append(case)

    with contextlib.suppress(Unsatisfiable):
        collect()
    return iter(cases)


# A long run by hand outlasts the suite's 300 s per test: about 36 operations x 2 modes x
# two requests each per example.
@pytest.mark.timeout(300 + 10 * EXAMPLES)
@pytest.mark.parametrize("secured", [False, True], ids=["open", "tokens"])
def test_fuzz_proxy_against_primary(
    primary: ChromaServer,
    seed: dict[str, str],
    secured: bool,
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
) -> None:
    name = "secured_fuzz_proxy" if secured else "fuzz_proxy"
    fuzz_proxy: ProxyProcess = request.getfixturevalue(name)
    headers = {"Authorization": f"Bearer {FUZZER}"} if secured else {}
    raw = httpx.get(primary.url + "/openapi.json", timeout=TIMEOUT_S).json()
    schema = schemathesis.openapi.from_dict(raw)
    ops = [result.ok() for result in schema.get_all_operations() if isinstance(result, Ok)]
    assert len(ops) == len(list(schema.get_all_operations())), "operations schemathesis refused"
    # Reads a replica may answer first, while the seed's replica is current (writes send its
    # reads to the primary until it is rebuilt); then everything in the document's order;
    # then the reads again, over the rows the writes left (the proxy applied them itself).
    reads = [op for op in ops if classify(op.method.upper(), op.path).kind is RouteClass.LOCAL_READ]
    tally = Tally(Counter(), [], headers)
    for op in [*reads, *(op for op in ops if op not in reads), *reads]:
        names = {p.name for p in op.path_parameters}
        op_id = op.definition.raw.get("operationId", "")
        keep = UNPINNED.get(op_id, set())
        pins = {n: seed[n] for n in names if n in seed and n not in keep} | BY_NAME.get(op_id, {})
        # The document's examples once each, then valid and invalid cases, path parameters
        # naming the seed where the operation has them.
        runs = [(example, 1) for example in op.get_strategies_from_examples()]
        runs += [(op.as_strategy(mode, path_parameters=pins), EXAMPLES)
                 for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)]  # fmt: skip
        if op_id in ROW_WRITES:  # and rows the primary takes, for the proxy to apply
            runs.append((op.as_strategy(path_parameters=pins).map(fit_rows), EXAMPLES))
        for strategy, examples in runs:
            for case in each_case(strategy, examples):
                tally.check(op.label, case, fuzz_proxy.url, primary.url)
    with capsys.disabled():  # shown in every run, passed or not: which behaviours were seen
        print("\n" + summary(tally))
    assert not tally.failures, "\n".join(tally.failures[:20])


# Record writes whose generated bodies the primary all but never takes (the columns' lengths
# differ, the embeddings are not the seed's 3 dimensions); fit_rows mends them.
ROW_WRITES = ("collection_add", "collection_upsert", "collection_update")
COLUMNS = ("embeddings", "documents", "metadatas", "uris")


def fit_rows(case: Case[Any]) -> Case[Any]:
    """The case with every column as long as ``ids`` and embeddings of 3 numbers; what the
    rows hold (metadata keys and values, documents, uris) stays as generated."""
    body = case.body
    if not isinstance(body, dict) or not isinstance(ids := body.get("ids"), list):
        return case
    n = len(ids)
    fitted: dict[str, Any] = dict(body)
    for key in COLUMNS:
        if isinstance(column := body.get(key), list):
            fitted[key] = (column + [None] * n)[:n]
    if isinstance(vectors := fitted.get("embeddings"), list):
        fitted["embeddings"] = [e if isinstance(e, list) and len(e) == 3 else [float(i), 1.0, 0.5]
                                for i, e in enumerate(vectors)]  # fmt: skip
    case.body = fitted
    return case


def summary(tally: Tally) -> str:
    lines = [f"fuzz: {tally.requests} requests, {EXAMPLES} examples per operation and mode"]
    totals: Counter[str] = Counter()
    for (_, seen), n in tally.seen.items():
        totals[seen] += n
    lines.append("  " + ", ".join(f"{seen}: {n}" for seen, n in totals.most_common()))
    ops = sorted({op for op, _ in tally.seen})
    for op in ops:
        here = [(seen, n) for (o, seen), n in tally.seen.items() if o == op]
        lines.append(f"  {op}: " + ", ".join(f"{seen} {n}" for seen, n in sorted(here)))
    lines += [f"  the primary dropped {op}, e.g. {curl}" for op, curl in tally.drops.items()]
    return "\n".join(lines)


def test_a_read_under_invalid_names_leaves_no_replica_request(fuzz_proxy: ProxyProcess) -> None:
    """Found by the fuzz (no answer differed): a read of a collection id under a database
    name the primary refuses asks for a replica on demand, whose lookup answers 400; that
    was retried for ever, so each such id was kept with a retry timer."""
    cid = str(uuid.uuid4())
    resp = httpx.get(f"{fuzz_proxy.url}/api/v2/tenants/{T}/databases/0/collections/{cid}/count")
    assert resp.status_code == 400 and resp.headers["X-Proxy-Source"] == "primary"

    def known() -> dict[str, Any]:
        status = httpx.get(f"{fuzz_proxy.url}/admin/status", timeout=TIMEOUT_S,
                           headers={"Authorization": f"Bearer {ADMIN}"})  # fmt: skip
        found: dict[str, Any] = status.json()["sync"]["known"]
        return found

    wait_until(lambda: cid not in known(), 30, "the on-demand request dropped")


def test_judge_says_whose_fault() -> None:
    """The classification itself, on hand-made answers: each rule can fail."""
    err = orjson.dumps({"error": "ChromaError", "message": "m"})
    ours = orjson.dumps({"error": "ChromaError", "message": "replica-proxy: the primary..."})
    ok = Answer(200, b"{}", "-")
    assert judge(Answer(502, ours, "proxy"), DROPPED) == ("dropped->502", None)
    assert judge(Answer(502, b"Bad Gateway", "proxy"), DROPPED)[1] is not None
    assert judge(Answer(403, ours, "proxy"), DROPPED)[1] is None  # refused, never sent
    assert judge(Answer(403, ours, "primary"), DROPPED)[1] is not None
    assert judge(DROPPED, DROPPED)[1] is not None
    assert judge(DROPPED, ok)[1] is not None
    assert judge(Answer(504, ours, "proxy"), TIMED_OUT) == ("timed out->504", None)
    assert judge(TIMED_OUT, ok)[1] is not None
    assert judge(Answer(500, ours, "proxy"), ok)[1] is not None
    assert judge(Answer(500, b"x", "primary"), Answer(500, b"x", "-")) == ("passed on", None)
    # The proxy's own 5xx is no pass-on, even where the primary answers 5xx too.
    assert judge(Answer(500, ours, "proxy"), Answer(500, err, "-"))[1] is not None
    assert judge(Answer(502, ours, "primary"), Answer(500, err, "-"))[1] is not None
    assert judge(Answer(200, b"{}", "replica"), Answer(500, err, "-"))[1] is not None
    assert judge(Answer(200, b"{}", "replica"), Answer(400, err, "-"))[1] is not None
    assert judge(Answer(400, ours, "proxy"), Answer(500, err, "-"))[1] is None  # its limits
    assert judge(Answer(400, b"oops", "proxy"), Answer(400, err, "-"))[1] is not None
    assert judge(Answer(413, b"too big", "primary"), Answer(413, b"too big", "-"))[1] is None
    trace = Answer(400, b'{"error":"E","message":"Traceback (most recent call last)"}', "proxy")
    assert judge(trace, Answer(400, err, "-"))[1] is not None
