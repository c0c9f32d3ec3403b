"""Access control, exhaustively (issue 12): every token shape on every route class that
proxy/routes.py knows, against a real primary, cache hits and coalesced requests included;
tenant A's token never sees tenant B's data by any path.

Each cell (route x token) is one test case, named ``route-token``. What a cell must answer
comes from the tables below (NEEDS, REACH, HIDDEN, IDENTITY), written out by hand and never
taken from proxy/access/auth.py, so a wrong rule in the proxy fails here. An allowed cell must give
the right answer (the primary's own, asked directly, or the record it made on the primary);
a refused one Chroma's error JSON from the proxy itself, with no record of either tenant in
it and nothing changed on the primary. Cells that change something (writes, deletions,
reset) work on objects made for that cell, so the order of the cells does not matter.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import secrets
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
import pytest

from tests.helpers import ChromaServer, ProxyProcess, wait_until

# --- the expectation tables ------------------------------------------------------------------

ROLES = ("read", "write", "admin")
# Scope shapes, relative to tenant A's database "prod" (where the matrix's collections live).
SHAPES = {
    "exact": "{a}/prod",
    "db_wild": "{a}/*",
    "tenant_wild": "*/prod",
    "all": "*/*",
    "other_tenant": "{b}/prod",
    "other_db": "{a}/other",
}
# An admin token must hold */* (proxy/access/auth.py refuses a tokens file with a narrower one: no
# scope bounds a reset or a new tenant), so there is one admin token.
TOKENS = ("none", "wrong", *(f"{role}:{shape}" for role in ROLES[:2] for shape in SHAPES),
          "admin:all")  # fmt: skip

Reach = Literal["A", "B", "A_whole", "A_some"]
# What each scope shape reaches. A: tenant A's database prod. B: tenant B's database prod.
# A_whole: every database of tenant A, which listing, creating or deleting A's databases
# needs. A_some: some database of tenant A, which is enough to look tenant A itself up.
#
# Listings (a database's collections, a tenant's databases) outside a token's scope are
# refused with 403, not filtered down to what the token may see: filtering would need an
# answer per token (no shared cache entry) and would still tell that the database exists.
# fmt: off
_REACH_COLUMNS: tuple[Reach, ...] = ("A",   "B",   "A_whole", "A_some")
_REACH_ROWS = {
    "exact":                          (True,  False, False,     True),
    "db_wild":                        (True,  False, True,      True),
    "tenant_wild":                    (True,  True,  False,     True),
    "all":                            (True,  True,  True,      True),
    "other_tenant":                   (False, True,  False,     False),
    "other_db":                       (False, False, False,     True),
}
# fmt: on
REACH = {shape: dict(zip(_REACH_COLUMNS, row, strict=True)) for shape, row in _REACH_ROWS.items()}

MinRole = Literal["any", "read", "write", "admin"]
# Every route and what a request on it needs: the least role, and what the token's scope must
# reach. "any": any valid token. admin needs no reach: an admin token may do anything (its
# scopes are not consulted; README, access control).
# fmt: off
NEEDS: dict[str, tuple[MinRole, Reach | None]] = {
    # Say nothing about anybody's data.
    "heartbeat":               ("any",   None),
    "version":                 ("any",   None),
    "pre_flight_checks":       ("any",   None),
    "healthcheck":             ("any",   None),
    "identity":                ("any",   None),
    # Local reads of A's collection (a replica may answer), lookups by name and by id.
    "query":                   ("read",  "A"),
    "get":                     ("read",  "A"),
    "count":                   ("read",  "A"),
    "get_collection":          ("read",  "A"),
    "get_collection_by_id":    ("read",  "A"),
    "list_collections":        ("read",  "A"),
    "count_collections":       ("read",  "A"),
    "query_cached":            ("read",  "A"),   # a cache hit for the tokens allowed
    "query_coalesced":         ("read",  "A"),   # concurrent with identical admin queries
    "own_simple_id_count":     ("read",  "A"),   # A's own id without hyphens
    "own_urn_id_get":          ("read",  "A"),   # A's own id as urn:uuid:...
    "get_uuid_named":          ("read",  "A"),   # a collection whose name looks like an id
    # Forwarded reads.
    "get_database":            ("read",  "A"),
    "get_tenant":              ("read",  "A_some"),
    "list_databases":          ("read",  "A_whole"),
    "search":                  ("read",  "A"),
    "fork_count":              ("read",  "A"),
    "indexing_status":         ("read",  "A"),
    # Tenant B's data by B's own path.
    "b_get":                   ("read",  "B"),
    "b_query_cached":          ("read",  "B"),
    # Writes to records and collections of A.
    "add":                     ("write", "A"),
    "upsert":                  ("write", "A"),
    "update":                  ("write", "A"),
    "delete":                  ("write", "A"),
    "create_collection":       ("write", "A"),
    "modify_collection":       ("write", "A"),
    "delete_collection":       ("write", "A"),
    "delete_uuid_named":       ("write", "A"),
    "fork":                    ("write", "A"),
    # Databases of A: only a token holding tenant A whole.
    "create_database":         ("write", "A_whole"),
    "delete_database":         ("write", "A_whole"),
    # Tenant B's collection id under tenant A's path (the primary ignores the path's tenant
    # and database on record routes and modify, chroma-wire.md 14.11), in every spelling of
    # the id the primary accepts.
    "smuggle_count":           ("read",  "A"),
    "smuggle_get":             ("read",  "A"),
    "smuggle_query":           ("read",  "A"),
    "smuggle_by_id":           ("read",  "A"),
    "smuggle_simple_id_get":   ("read",  "A"),
    "smuggle_upper_id_count":  ("read",  "A"),
    "smuggle_braced_id_get":   ("read",  "A"),
    "smuggle_urn_id_count":    ("read",  "A"),
    "smuggle_add":             ("write", "A"),
    "smuggle_modify":          ("write", "A"),
    "smuggle_simple_id_add":   ("write", "A"),
    "smuggle_delete_by_name":  ("write", "A"),   # by name: the primary looks in A only
    # Admin only: tenants, reset, the admin API, paths the proxy does not know.
    "create_tenant":           ("admin", None),
    "update_tenant":           ("admin", None),
    "admin_status":            ("admin", None),
    "admin_rebuild":           ("admin", None),
    "admin_unknown":           ("admin", None),
    "unknown_path":            ("admin", None),
    "unknown_method":          ("admin", None),
    "reset":                   ("admin", None),   # last: a reset taken drops all replicas
}
# A non-admin token that may ask is answered 404 here, as if the collection did not exist:
# it is not in the path's database. (An admin gets the primary's answer.)
HIDDEN = frozenset({
    "smuggle_count", "smuggle_get", "smuggle_query", "smuggle_by_id", "smuggle_simple_id_get",
    "smuggle_upper_id_count", "smuggle_braced_id_get", "smuggle_urn_id_count", "smuggle_add",
    "smuggle_modify", "smuggle_simple_id_add",
})
# fmt: on
# /api/v2/auth/identity per scope shape: (tenant, databases). The clients take their tenant
# from it: the first tenant named in the scopes, else default_tenant.
IDENTITY = {
    "exact": ("{a}", ["prod"]),
    "db_wild": ("{a}", []),
    "tenant_wild": ("default_tenant", ["prod"]),
    "all": ("default_tenant", []),
    "other_tenant": ("{b}", ["prod"]),
    "other_db": ("{a}", ["other"]),
}

Expect = Literal["allowed", "unauthenticated", "forbidden", "hidden"]
_RANK = {"read": 0, "write": 1, "admin": 2}


def expected(token: str, route: str) -> Expect:
    if token in ("none", "wrong"):
        return "unauthenticated"
    role, shape = token.split(":")
    need, reach = NEEDS[route]
    if need == "any":
        return "allowed"
    if _RANK[role] < _RANK[need]:
        return "forbidden"
    if role == "admin":
        return "allowed"
    assert reach is not None
    if not REACH[shape][reach]:
        return "forbidden"
    return "hidden" if route in HIDDEN else "allowed"


# --- the servers and their data --------------------------------------------------------------

N_RECORDS = 20
# Every document and record id of either tenant contains one of these; no refusal may.
SECRETS = ("secret of tenant", "-rec-")
QUERY = {"query_embeddings": [[3.2, 1.0, 0.0, 0.0]], "n_results": 3, "include": ["documents"]}


@dataclass(frozen=True)
class Tenant:
    key: str  # "a" or "b"
    name: str
    docs: str  # id of collection "docs", N_RECORDS records; never written to
    scratch: str  # id of collection "scratch": record writes land here

    @property
    def db(self) -> str:
        return f"/api/v2/tenants/{self.name}/databases/prod"

    def records(self, cid: str) -> str:
        return f"{self.db}/collections/{cid}"

    @property
    def some_ids(self) -> list[str]:
        return [f"{self.key}-rec-03", f"{self.key}-rec-11", f"{self.key}-rec-17"]


@dataclass
class Env:
    proc: ProxyProcess
    primary: httpx.Client
    proxy: httpx.Client
    a: Tenant
    b: Tenant
    uuid_named: tuple[str, str]  # (name, id) of A's collection named like a collection id
    plain: dict[str, str]  # token key -> the token itself
    _queries: Iterator[int] = field(default_factory=itertools.count)

    def send(self, token: str, method: str, path: str, body: Any = None) -> httpx.Response:
        headers = {} if token == "none" else {"Authorization": f"Bearer {self.plain[token]}"}
        return self.proxy.request(method, path, json=body, headers=headers)

    def admin(self, method: str, path: str, body: Any = None) -> Any:
        """Set-up through the proxy with the all-powerful token: the proxy then knows of the
        change (its cached listings are dropped), as it would in production."""
        resp = self.send("admin:all", method, path, body)
        assert resp.is_success, resp.text
        return resp.json()

    def fresh_query(self) -> dict[str, Any]:
        """A query no earlier request asked: not in any cache."""
        vector = [3.0 + next(self._queries) * 1e-4, 1.0, 0.0, 0.0]
        return {**QUERY, "query_embeddings": [vector]}

    def metadata_on_primary(self, tenant: Tenant, cid: str) -> Any:
        resp = self.primary.get(f"{tenant.db}/collections/by-id/{cid}")
        assert resp.status_code == 200, resp.text
        return resp.json()["metadata"]


def _token_file(plain: dict[str, str], a: str, b: str) -> str:
    lines = []
    for key, token in plain.items():
        if key == "wrong":
            continue  # in nobody's file
        role, shape = key.split(":")
        scope = SHAPES[shape].format(a=a, b=b)
        digest = hashlib.sha256(token.encode()).hexdigest()
        lines += [f"[tokens.{role}_{shape}]", f'sha256 = "{digest}"', f'role = "{role}"',
                  f'scopes = ["{scope}"]', ""]  # fmt: skip
    return "\n".join(lines)


def _tenant(primary: httpx.Client, key: str) -> Tenant:
    name = f"t{key}-{uuid.uuid4().hex[:8]}"
    assert primary.post("/api/v2/tenants", json={"name": name}).status_code == 200
    for database in ("prod", "other"):
        made = primary.post(f"/api/v2/tenants/{name}/databases", json={"name": database})
        assert made.status_code == 200, made.text
    db = f"/api/v2/tenants/{name}/databases/prod"
    ids = {}
    for collection in ("docs", "scratch"):
        made = primary.post(f"{db}/collections", json={"name": collection})
        assert made.status_code == 200, made.text
        ids[collection] = made.json()["id"]
    rows = {
        "ids": [f"{key}-rec-{i:02d}" for i in range(N_RECORDS)],
        "embeddings": [[float(i), 1.0, 0.0, float(key == "b")] for i in range(N_RECORDS)],
        "documents": [f"secret of tenant {key} #{i}" for i in range(N_RECORDS)],
    }
    added = primary.post(f"{db}/collections/{ids['docs']}/add", json=rows)
    assert added.status_code == 201, added.text
    return Tenant(key, name, ids["docs"], ids["scratch"])


@pytest.fixture(scope="module")
def env(chroma: ChromaServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    primary = httpx.Client(base_url=chroma.url, timeout=60)
    a, b = _tenant(primary, "a"), _tenant(primary, "b")
    named = str(uuid.uuid4())  # a name that is no collection's id
    made = primary.post(f"{a.db}/collections", json={"name": named})
    assert made.status_code == 200, made.text
    plain = {key: secrets.token_urlsafe(24) for key in TOKENS if key != "none"}
    log_dir = tmp_path_factory.mktemp("auth-matrix")
    tokens_file = log_dir / "tokens.toml"
    tokens_file.write_text(_token_file(plain, a.name, b.name))
    proc = ProxyProcess(
        "--primary", chroma.url, "--tokens-file", str(tokens_file),
        "--replicate", f"{a.name}/prod,{b.name}/prod", "--data-dir", str(log_dir / "data"),
        log_dir=log_dir,
    )  # fmt: skip
    proxy = httpx.Client(base_url=proc.url, timeout=60)
    built = Env(proc, primary, proxy, a, b, (named, made.json()["id"]), plain)
    try:
        for tenant in (a, b):  # both served by replicas before the first cell
            path = f"{tenant.records(tenant.docs)}/query"
            wait_until(functools.partial(_served_locally, built, path), 90, "replica")
        yield built
    finally:
        proxy.close()
        primary.close()
        assert proc.stop() == 0, proc.logs()


def _served_locally(env: Env, path: str) -> bool:
    return _source(env, "admin:all", path) != "primary"


def _source(env: Env, token: str, path: str, body: Any = QUERY) -> str:
    resp = env.send(token, "POST", path, body)
    assert resp.status_code == 200, resp.text
    return resp.headers["X-Proxy-Source"]


# --- the probes: one per route, each sends its request and says how to judge the answer -----


def _nothing() -> None:
    pass


@dataclass
class Probe:
    resps: list[httpx.Response]  # the cell token's answers (several for coalesced requests)
    right: Callable[[], None]  # asserts, for an allowed cell: the answer is the right one
    unchanged: Callable[[], None] = _nothing  # asserts, for a refused cell: no change made


ProbeFn = Callable[[Env, str], Probe]
PROBES: dict[str, ProbeFn] = {}


def probe(name: str) -> Callable[[ProbeFn], ProbeFn]:
    def register(fn: ProbeFn) -> ProbeFn:
        PROBES[name] = fn
        return fn

    return register


def _json(resp: httpx.Response, status: int = 200) -> Any:
    assert resp.status_code == status, f"{resp.status_code} {resp.text[:300]}"
    return resp.json()


def _model(data: Any) -> tuple[Any, ...]:
    """What identifies a collection model (the local answer may lay the rest out otherwise)."""
    return data["id"], data["name"], data["tenant"], data["database"], data["metadata"]


def _same_as_primary(
    env: Env,
    resp: httpx.Response,
    method: str,
    path: str,
    body: Any = None,
    norm: Callable[[Any], Any] = lambda data: data,
) -> Callable[[], None]:
    """The answer is what the primary answers to the same request (reads, and requests the
    primary refuses: nothing changes when it is asked too)."""

    def right() -> None:
        want = env.primary.request(method, path, json=body)
        assert resp.status_code == want.status_code, f"{resp.status_code} {resp.text[:300]}"
        if want.content:
            assert norm(resp.json()) == norm(want.json())
        else:
            assert resp.content == b""

    return right


def _read(env: Env, token: str, method: str, path: str, body: Any = None) -> Probe:
    resp = env.send(token, method, path, body)
    return Probe([resp], _same_as_primary(env, resp, method, path, body))


def _get_of(path: str) -> ProbeFn:
    def run(env: Env, token: str) -> Probe:
        return _read(env, token, "GET", path)

    return run


probe("version")(_get_of("/api/v2/version"))
probe("pre_flight_checks")(_get_of("/api/v2/pre-flight-checks"))
probe("healthcheck")(_get_of("/api/v2/healthcheck"))
probe("unknown_path")(_get_of("/api/v2/no-such-route"))


@probe("heartbeat")
def _heartbeat(env: Env, token: str) -> Probe:
    resp = env.send(token, "GET", "/api/v2/heartbeat")
    return Probe([resp], lambda: _expect(isinstance(_json(resp)["nanosecond heartbeat"], int)))


def _expect(ok: bool) -> None:
    assert ok


@probe("identity")
def _identity(env: Env, token: str) -> Probe:
    resp = env.send(token, "GET", "/api/v2/auth/identity")

    def right() -> None:
        role, shape = token.split(":")
        tenant, databases = IDENTITY[shape]
        want = {"user_id": f"{role}_{shape}", "databases": databases,
                "tenant": tenant.format(a=env.a.name, b=env.b.name)}  # fmt: skip
        assert _json(resp) == want

    return Probe([resp], right)


@probe("query")
def _query(env: Env, token: str) -> Probe:
    return _read(env, token, "POST", f"{env.a.records(env.a.docs)}/query", QUERY)


@probe("get")
def _get(env: Env, token: str) -> Probe:
    body = {"ids": env.a.some_ids, "include": ["documents"]}
    return _records_read(env, token, env.a.records(env.a.docs), body)


def _records_read(env: Env, token: str, path: str, body: Any, where: str = "") -> Probe:
    """A get answered like the primary's get of ``where`` (default: the same path)."""
    resp = env.send(token, "POST", f"{path}/get", body)
    by_id = _same_as_primary(env, resp, "POST", f"{where or path}/get", body, _by_id)
    return Probe([resp], by_id)


def _by_id(data: Any) -> Any:
    return sorted(zip(data["ids"], data["documents"], strict=True))


@probe("count")
def _count(env: Env, token: str) -> Probe:
    return _read(env, token, "GET", f"{env.a.records(env.a.docs)}/count")


@probe("get_collection")
def _get_collection(env: Env, token: str) -> Probe:
    path = f"{env.a.db}/collections/docs"
    resp = env.send(token, "GET", path)
    return Probe([resp], _same_as_primary(env, resp, "GET", path, norm=_model))


@probe("get_collection_by_id")
def _get_collection_by_id(env: Env, token: str) -> Probe:
    path = f"{env.a.db}/collections/by-id/{env.a.docs}"
    resp = env.send(token, "GET", path)
    return Probe([resp], _same_as_primary(env, resp, "GET", path, norm=_model))


@probe("list_collections")
def _list_collections(env: Env, token: str) -> Probe:
    path = f"{env.a.db}/collections"
    resp = env.send(token, "GET", path)
    norm: Callable[[Any], Any] = lambda data: sorted(_model(c) for c in data)  # noqa: E731
    return Probe([resp], _same_as_primary(env, resp, "GET", path, norm=norm))


@probe("count_collections")
def _count_collections(env: Env, token: str) -> Probe:
    return _read(env, token, "GET", f"{env.a.db}/collections_count")


def _cached(env: Env, token: str, tenant: Tenant) -> Probe:
    """The admin token asks until the answer comes from the cache; then the cell's token asks
    the same (an allowed one until its answer comes from the cache too)."""
    path = f"{tenant.records(tenant.docs)}/query"
    wait_until(lambda: _source(env, "admin:all", path) == "cache", 90, "a cached answer")
    resp = env.send(token, "POST", path, QUERY)
    want = env.primary.post(path, json=QUERY)

    def right() -> None:
        nonlocal resp
        if resp.headers.get("X-Proxy-Source") != "cache":  # a new generation came in between
            wait_until(lambda: _source(env, token, path) == "cache", 90, "a cached answer")
            resp = env.send(token, "POST", path, QUERY)
        assert _json(resp) == want.json()

    return Probe([resp], right)


probe("query_cached")(lambda env, token: _cached(env, token, env.a))
probe("b_query_cached")(lambda env, token: _cached(env, token, env.b))


@probe("query_coalesced")
def _query_coalesced(env: Env, token: str) -> Probe:
    """Identical fresh queries (no cached answer) at once: four by the admin token, four by
    the cell's; the cell's token must get its own answer, never a ride on the admin's."""
    path = f"{env.a.records(env.a.docs)}/query"
    body = env.fresh_query()
    want = env.primary.post(path, json=body).json()
    senders = ["admin:all", token] * 4
    start = threading.Barrier(len(senders))

    def ask(sender: str) -> httpx.Response:
        start.wait(30)
        return env.send(sender, "POST", path, body)

    with ThreadPoolExecutor(len(senders)) as pool:
        answers = list(pool.map(ask, senders))
    for sender, resp in zip(senders, answers, strict=True):
        if sender == "admin:all":
            assert _json(resp) == want
    mine = [resp for sender, resp in zip(senders, answers, strict=True) if sender == token]

    def right() -> None:
        for resp in mine:
            assert _json(resp) == want

    return Probe(mine, right)


def _simple(cid: str) -> str:
    return cid.replace("-", "")


@probe("own_simple_id_count")
def _own_simple_id_count(env: Env, token: str) -> Probe:
    return _read(env, token, "GET", f"{env.a.records(_simple(env.a.docs))}/count")


@probe("own_urn_id_get")
def _own_urn_id_get(env: Env, token: str) -> Probe:
    body = {"ids": env.a.some_ids, "include": ["documents"]}
    path = env.a.records(f"urn:uuid:{env.a.docs}")
    return _records_read(env, token, path, body, where=env.a.records(env.a.docs))


@probe("get_uuid_named")
def _get_uuid_named(env: Env, token: str) -> Probe:
    name, cid = env.uuid_named
    resp = env.send(token, "GET", f"{env.a.db}/collections/{name}")
    return Probe([resp], lambda: _expect(_json(resp)["id"] == cid))


@probe("get_database")
def _get_database(env: Env, token: str) -> Probe:
    return _read(env, token, "GET", env.a.db)


@probe("get_tenant")
def _get_tenant(env: Env, token: str) -> Probe:
    return _read(env, token, "GET", f"/api/v2/tenants/{env.a.name}")


@probe("list_databases")
def _list_databases(env: Env, token: str) -> Probe:
    path = f"/api/v2/tenants/{env.a.name}/databases"
    resp = env.send(token, "GET", path)
    norm: Callable[[Any], Any] = lambda data: sorted(d["name"] for d in data)  # noqa: E731
    return Probe([resp], _same_as_primary(env, resp, "GET", path, norm=norm))


@probe("search")
def _search(env: Env, token: str) -> Probe:  # the primary: 501, not for local chroma
    return _read(env, token, "POST", f"{env.a.records(env.a.docs)}/search", {"searches": []})


@probe("fork_count")
def _fork_count(env: Env, token: str) -> Probe:  # the primary: 501
    return _read(env, token, "GET", f"{env.a.records(env.a.docs)}/fork_count")


@probe("indexing_status")
def _indexing_status(env: Env, token: str) -> Probe:  # the primary: 500, not implemented
    return _read(env, token, "GET", f"{env.a.records(env.a.docs)}/indexing_status")


@probe("b_get")
def _b_get(env: Env, token: str) -> Probe:
    body = {"ids": env.b.some_ids, "include": ["documents"]}
    return _records_read(env, token, env.b.records(env.b.docs), body)


# Record writes (to A's scratch collection, or by a smuggled id to B's).


def _uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def _record_write(env: Env, token: str, op: str, tenant: Tenant, path: str) -> Probe:
    """One record write through the proxy, judged by the records of ``tenant``'s scratch
    collection on the primary. update and delete work on a record made for the cell."""
    rid = _uid(op)
    scratch = tenant.records(tenant.scratch)
    if op in ("update", "delete"):
        made = {"ids": [rid], "embeddings": [[1.0, 2.0, 3.0, 4.0]], "documents": ["before"]}
        assert env.primary.post(f"{scratch}/add", json=made).status_code == 201
    bodies: dict[str, Any] = {
        "add": {"ids": [rid], "embeddings": [[1.0, 2.0, 3.0, 4.0]], "documents": ["added"]},
        "upsert": {"ids": [rid], "embeddings": [[1.0, 2.0, 3.0, 4.0]], "documents": ["added"]},
        "update": {"ids": [rid], "documents": ["after"]},
        "delete": {"ids": [rid]},
    }
    resp = env.send(token, "POST", f"{path}/{op}", bodies[op])

    def documents() -> list[str]:
        got = env.primary.post(f"{scratch}/get", json={"ids": [rid], "include": ["documents"]})
        found: list[str] = got.json()["documents"]
        return found

    before = {"add": [], "upsert": [], "update": ["before"], "delete": ["before"]}[op]
    after = {"add": ["added"], "upsert": ["added"], "update": ["after"], "delete": []}[op]

    def right() -> None:
        _json(resp, 201 if op == "add" else 200)
        assert documents() == after

    return Probe([resp], right, lambda: _expect(documents() == before))


def _a_scratch(env: Env) -> str:
    return env.a.records(env.a.scratch)


def _writing(op: str) -> ProbeFn:
    def run(env: Env, token: str) -> Probe:
        return _record_write(env, token, op, env.a, _a_scratch(env))

    return run


for _op in ("add", "upsert", "update", "delete"):
    probe(_op)(_writing(_op))


@probe("smuggle_add")
def _smuggle_add(env: Env, token: str) -> Probe:
    return _record_write(env, token, "add", env.b, env.a.records(env.b.scratch))


@probe("smuggle_simple_id_add")
def _smuggle_simple_id_add(env: Env, token: str) -> Probe:
    return _record_write(env, token, "add", env.b, env.a.records(_simple(env.b.scratch)))


# Collections, databases, tenants.


def _exists(env: Env, path: str) -> bool:
    status = env.primary.get(path).status_code
    assert status in (200, 404)
    return status == 200


@probe("create_collection")
def _create_collection(env: Env, token: str) -> Probe:
    name = _uid("new")
    resp = env.send(token, "POST", f"{env.a.db}/collections", {"name": name})

    def right() -> None:
        made = _json(resp)
        assert (made["name"], made["tenant"], made["database"]) == (name, env.a.name, "prod")
        assert _exists(env, f"{env.a.db}/collections/{name}")

    return Probe([resp], right, lambda: _expect(not _exists(env, f"{env.a.db}/collections/{name}")))


def _modify(env: Env, token: str, tenant: Tenant, cid: str) -> Probe:
    """Sets the metadata of ``tenant``'s collection ``cid`` through A's path."""
    marker = {"set_by": _uid(token.replace(":", "-"))}
    resp = env.send(token, "PUT", f"{env.a.db}/collections/{cid}", {"new_metadata": marker})

    def right() -> None:
        _json(resp)
        assert env.metadata_on_primary(tenant, cid) == marker

    return Probe([resp], right, lambda: _expect(env.metadata_on_primary(tenant, cid) != marker))


@probe("modify_collection")
def _modify_collection(env: Env, token: str) -> Probe:
    made = env.admin("POST", f"{env.a.db}/collections", {"name": _uid("mod")})
    return _modify(env, token, env.a, made["id"])


@probe("smuggle_modify")
def _smuggle_modify(env: Env, token: str) -> Probe:
    return _modify(env, token, env.b, env.b.scratch)


def _delete_collection(env: Env, token: str, name: str) -> Probe:
    path = f"{env.a.db}/collections/{name}"
    resp = env.send(token, "DELETE", path)

    def right() -> None:
        _json(resp)
        assert not _exists(env, path)

    return Probe([resp], right, lambda: _expect(_exists(env, path)))


@probe("delete_collection")
def _delete_collection_by_name(env: Env, token: str) -> Probe:
    name = _uid("gone")
    env.admin("POST", f"{env.a.db}/collections", {"name": name})
    return _delete_collection(env, token, name)


@probe("delete_uuid_named")
def _delete_uuid_named(env: Env, token: str) -> Probe:
    name = str(uuid.uuid4())
    env.admin("POST", f"{env.a.db}/collections", {"name": name})
    return _delete_collection(env, token, name)


@probe("smuggle_delete_by_name")
def _smuggle_delete_by_name(env: Env, token: str) -> Probe:
    """B's collection id on A's by-name path: the primary looks for that name in A (404)."""
    path = f"{env.a.db}/collections/{env.b.docs}"
    resp = env.send(token, "DELETE", path)
    still = f"{env.b.db}/collections/by-id/{env.b.docs}"

    def right() -> None:
        assert _json(resp, 404)["error"] == "NotFoundError"
        assert _exists(env, still)

    return Probe([resp], right, lambda: _expect(_exists(env, still)))


@probe("fork")
def _fork(env: Env, token: str) -> Probe:  # the primary: 501 for local chroma
    body = {"new_name": _uid("fork")}
    return _read(env, token, "POST", f"{_a_scratch(env)}/fork", body)


@probe("create_database")
def _create_database(env: Env, token: str) -> Probe:
    name = _uid("db")
    resp = env.send(token, "POST", f"/api/v2/tenants/{env.a.name}/databases", {"name": name})
    path = f"/api/v2/tenants/{env.a.name}/databases/{name}"

    def right() -> None:
        _json(resp)
        assert _exists(env, path)

    return Probe([resp], right, lambda: _expect(not _exists(env, path)))


@probe("delete_database")
def _delete_database(env: Env, token: str) -> Probe:
    name = _uid("dbx")
    env.admin("POST", f"/api/v2/tenants/{env.a.name}/databases", {"name": name})
    path = f"/api/v2/tenants/{env.a.name}/databases/{name}"
    resp = env.send(token, "DELETE", path)

    def right() -> None:
        _json(resp)
        assert not _exists(env, path)

    return Probe([resp], right, lambda: _expect(_exists(env, path)))


@probe("create_tenant")
def _create_tenant(env: Env, token: str) -> Probe:
    name = _uid("tn")
    resp = env.send(token, "POST", "/api/v2/tenants", {"name": name})

    def right() -> None:
        _json(resp)
        assert _exists(env, f"/api/v2/tenants/{name}")

    return Probe([resp], right, lambda: _expect(not _exists(env, f"/api/v2/tenants/{name}")))


@probe("update_tenant")
def _update_tenant(env: Env, token: str) -> Probe:
    """Chroma 1.5.9 answers 200 {} and changes nothing visible: the answer is judged."""
    name = _uid("tn")
    env.admin("POST", "/api/v2/tenants", {"name": name})
    body = {"resource_name": _uid("res")}
    return _read(env, token, "PATCH", f"/api/v2/tenants/{name}", body)


@probe("unknown_method")
def _unknown_method(env: Env, token: str) -> Probe:  # the primary: 405, empty
    return _read(env, token, "DELETE", f"{env.a.records(env.a.docs)}/count")


@probe("reset")
def _reset(env: Env, token: str) -> Probe:
    """The primary runs without allow_reset: it refuses, and an admin gets that answer. (Not
    asked of the primary directly: were reset allowed there, that would wipe the session's
    primary.)"""
    resp = env.send(token, "POST", "/api/v2/reset")
    count = f"{env.a.records(env.a.docs)}/count"

    def right() -> None:
        refused = {"error": "ChromaError", "message": "Reset is disabled by config"}
        assert _json(resp, 403) == refused
        assert env.primary.get(count).json() == N_RECORDS

    return Probe([resp], right, lambda: _expect(env.primary.get(count).json() == N_RECORDS))


# The admin API.


@probe("admin_status")
def _admin_status(env: Env, token: str) -> Probe:
    resp = env.send(token, "GET", "/admin/status")

    def right() -> None:
        status = _json(resp)
        assert status["role"] == "standalone" and isinstance(status["replicas"], list)

    return Probe([resp], right)


@probe("admin_rebuild")
def _admin_rebuild(env: Env, token: str) -> Probe:
    body = {"collection": env.a.scratch, "tenant": env.a.name, "database": "prod"}
    resp = env.send(token, "POST", "/admin/rebuild", body)
    return Probe([resp], lambda: _json(resp, 202))


@probe("admin_unknown")
def _admin_unknown(env: Env, token: str) -> Probe:
    resp = env.send(token, "GET", "/admin/no-such-endpoint")
    return Probe([resp], lambda: _expect(_json(resp, 404)["error"] == "NotFoundError"))


# Tenant B's collection id under tenant A's path: read.


def _smuggled_read(env: Env, token: str, cid: str, op: str) -> Probe:
    """B's docs through A's path with the id spelled ``cid``; an admin gets what the primary
    answers, which is B's records (it ignores the path's tenant and database)."""
    path = env.a.records(cid)
    real = env.b.records(env.b.docs)
    if op == "count":
        resp = env.send(token, "GET", f"{path}/count")
        return Probe([resp], _same_as_primary(env, resp, "GET", f"{real}/count"))
    if op == "query":
        resp = env.send(token, "POST", f"{path}/query", QUERY)
        return Probe([resp], _same_as_primary(env, resp, "POST", f"{real}/query", QUERY))
    body = {"ids": env.b.some_ids, "include": ["documents"]}
    return _records_read(env, token, path, body, where=real)


def _smuggling(op: str, spell: Callable[[str], str] = str) -> ProbeFn:
    def run(env: Env, token: str) -> Probe:
        return _smuggled_read(env, token, spell(env.b.docs), op)

    return run


probe("smuggle_count")(_smuggling("count"))
probe("smuggle_get")(_smuggling("get"))
probe("smuggle_query")(_smuggling("query"))
probe("smuggle_simple_id_get")(_smuggling("get", _simple))
probe("smuggle_upper_id_count")(_smuggling("count", str.upper))
probe("smuggle_braced_id_get")(_smuggling("get", lambda cid: f"{{{cid}}}"))
probe("smuggle_urn_id_count")(_smuggling("count", lambda cid: f"urn:uuid:{cid}"))


@probe("smuggle_by_id")
def _smuggle_by_id(env: Env, token: str) -> Probe:  # the primary looks in A only: 404
    return _read(env, token, "GET", f"{env.a.db}/collections/by-id/{env.b.docs}")


# --- the matrix -------------------------------------------------------------------------------

CELLS = [(route, token) for route in NEEDS for token in TOKENS]


def test_every_route_has_a_probe() -> None:
    assert set(PROBES) == set(NEEDS)
    assert set(NEEDS) >= HIDDEN


def test_the_expectation_table_is_not_all_one_answer() -> None:
    """The matrix can fail: each kind of outcome is expected somewhere, for every role."""
    for role in ROLES:
        seen = {expected(f"{role}:{shape}", route) for route in NEEDS for shape in SHAPES}
        want = {"allowed", "forbidden", "hidden"} if role != "admin" else {"allowed"}
        assert seen == want, role
    assert {expected(t, r) for t in ("none", "wrong") for r in NEEDS} == {"unauthenticated"}


@pytest.mark.parametrize(("route", "token"), CELLS, ids=[f"{r}-{t}" for r, t in CELLS])
def test_cell(env: Env, route: str, token: str) -> None:
    want = expected(token, route)
    found = PROBES[route](env, token)
    if want == "allowed":
        found.right()
        return
    status, error = {
        "unauthenticated": (401, "AuthError"),
        "forbidden": (403, "AuthError"),
        "hidden": (404, "NotFoundError"),
    }[want]
    for resp in found.resps:
        seen = f"expected {want}, got {resp.status_code} {resp.text[:300]}"
        assert resp.status_code == status, seen
        # Answered by the proxy itself (not the primary, a replica or the cache), in Chroma's
        # error shape, and with no record of anybody in it.
        assert resp.headers["X-Proxy-Source"] == "proxy", seen
        body = resp.json()
        assert set(body) == {"error", "message"} and body["error"] == error, seen
        assert not any(marker in resp.text for marker in SECRETS), seen
    found.unchanged()


def test_the_proxy_log_names_no_token(env: Env) -> None:
    """Refusals are audited by the token's name; the tokens themselves appear nowhere."""
    assert env.send("read:exact", "POST", "/api/v2/reset").status_code == 403
    assert env.send("wrong", "GET", "/api/v2/heartbeat").status_code == 401
    logs = env.proc.logs()
    assert '"event": "forbidden"' in logs or '"event":"forbidden"' in logs
    assert not any(token in logs for token in env.plain.values())
