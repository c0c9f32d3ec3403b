"""Access control: who may send which request (issue 12). One stage of the request path,
run before anything else answers it: writes, forwarded reads, local reads, cache hits and
coalesced requests alike (proxy/handlers.py dispatch), and the admin API (proxy/ops/admin.py).

Chroma 1.5.9 checks no credentials at all (chroma-wire.md 13), so the proxy does, with what the
Chroma clients already send: ``Authorization: Bearer TOKEN`` or ``X-Chroma-Token: TOKEN``.
Tokens live in a TOML file (``tokens_file``), one table per token, named for the logs, stored
only as the SHA-256 of the token (tokens are long random strings: a plain hash is enough):

    [tokens.analytics]
    sha256 = "9f86d081884c7d65..."
    role = "read"                       # read | write | admin
    scopes = ["acme/*", "globex/prod"]  # tenant/database; * = any

read: reads of the databases in scope. write: those plus writes to records and collections in
them, and creating or deleting databases of a tenant it holds whole (``tenant/*``). admin:
everything, including reset, tenants, paths this proxy does not know, and the admin API.

The primary ignores the tenant and database in a record path (chroma-wire.md 14.11): a
collection id, in any spelling the primary accepts, is looked up (its replica, else the
primary, once per id) and its real tenant and database are what the scope is checked against,
and must be the path's.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import logging
import os
import re
import tomllib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson
from aiohttp import web
from cachetools import LRUCache

from proxy.errors import BadRequest, Forbidden, NotFound, Unauthorized
from proxy.routes import BY_NAME, Route, RouteClass, collection_id
from proxy.state import request_id

log = logging.getLogger(__name__)
audit = logging.getLogger("proxy.audit")

Role = Literal["read", "write", "admin"]
_RANK = {"read": 0, "write": 1, "admin": 2}
_HEX64 = re.compile(r"[0-9a-f]{64}")
# Any valid token may ask these: they say nothing about anybody's data.
_OPEN_OPS = frozenset({"heartbeat", "version", "pre_flight_checks", "healthcheck", "identity"})
# Writes a write token may make inside its scope; every other write needs admin.
_SCOPED_WRITES = frozenset({
    "create_collection", "modify_collection", "delete_collection", "add", "upsert", "update",
    "delete", "fork",
})  # fmt: skip
_DATABASE_WRITES = frozenset({"create_database", "delete_database"})
_WRITE_ROLE_OPS = _SCOPED_WRITES | _DATABASE_WRITES


class TokenFileError(ValueError):
    """The tokens file cannot be used; the message says where and why."""


@dataclass(frozen=True, slots=True)
class Token:
    name: str
    role: Role
    scopes: tuple[tuple[str, str], ...]  # (tenant, database), "*" = any

    def covers(self, tenant: str, database: str) -> bool:
        return any(t in ("*", tenant) and d in ("*", database) for t, d in self.scopes)

    def touches(self, tenant: str) -> bool:
        """Some database of the tenant is in scope (the tenant itself may be looked up)."""
        return any(t in ("*", tenant) for t, _ in self.scopes)

    def holds_tenant(self, tenant: str) -> bool:
        """Every database of the tenant is in scope (listing or creating databases)."""
        return any(t in ("*", tenant) and d == "*" for t, d in self.scopes)

    def identity(self) -> dict[str, Any]:
        """What /api/v2/auth/identity answers: the clients take their tenant and database
        from it when none is configured."""
        tenants = [t for t, _ in self.scopes if t != "*"]
        tenant = tenants[0] if tenants else "default_tenant"
        databases = [d for t, d in self.scopes if t in ("*", tenant) and d != "*"]
        return {"user_id": self.name, "tenant": tenant, "databases": databases}


ADMIN_TOKEN_NAME = "admin_token"


def load_tokens(path: Path, admin_token: str | None = None) -> dict[str, Token]:
    """Blocking: the tokens file as {sha256 hex: Token}; ``admin_token`` (the admin API's
    shared secret) is added as a token with the admin role. TokenFileError if unusable."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise TokenFileError(f"{path}: {exc}") from None
    tables = data.get("tokens")
    if not isinstance(tables, dict) or set(data) != {"tokens"}:
        raise TokenFileError(f"{path}: expected only [tokens.NAME] tables")
    found: dict[str, Token] = {}
    for name, table in tables.items():
        token, digest = _token(path, name, table)
        if digest in found:
            raise TokenFileError(f"{path}: tokens {found[digest].name} and {name} are the same")
        found[digest] = token
    if admin_token is not None:
        digest = hashlib.sha256(admin_token.encode()).hexdigest()
        found[digest] = Token(ADMIN_TOKEN_NAME, "admin", (("*", "*"),))
    return found


def _token(path: Path, name: str, table: object) -> tuple[Token, str]:
    where = f"{path}: [tokens.{name}]"
    if not isinstance(table, dict) or set(table) != {"sha256", "role", "scopes"}:
        raise TokenFileError(f"{where} needs exactly sha256, role and scopes")
    digest, role, scopes = table["sha256"], table["role"], table["scopes"]
    if not isinstance(digest, str) or not _HEX64.fullmatch(digest.lower()):
        raise TokenFileError(f"{where}: sha256 must be 64 hex digits (the token's SHA-256)")
    if role not in _RANK:
        raise TokenFileError(f"{where}: role must be read, write or admin")
    if not isinstance(scopes, list) or not scopes:
        raise TokenFileError(f'{where}: scopes must list "tenant/database" entries')
    pairs = []
    for scope in scopes:
        tenant, _, database = str(scope).partition("/")
        if not tenant or not database or "/" in database:
            raise TokenFileError(f'{where}: scope {scope!r} is not "tenant/database"')
        pairs.append((tenant, database))
    if role == "admin" and ("*", "*") not in pairs:
        # An admin resets the primary, makes tenants and reaches paths the proxy does not
        # know: no scope bounds that, so a narrower one would only look like a bound.
        raise TokenFileError(f'{where}: role admin needs scopes ["*/*"] (it acts on all)')
    return Token(name, role, tuple(pairs)), digest.lower()


# Remembered yeses (Guard.check) before the table starts again.
ALLOWED_MAX = 65_536


def _digest(sent: str | None) -> str | None:
    return None if sent is None else hashlib.sha256(sent.encode()).hexdigest()


def presented(request: web.BaseRequest) -> str | None:
    """The token a Chroma client sent (Bearer, or X-Chroma-Token), if any."""
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    sent = request.headers.get("X-Chroma-Token", "").strip()
    return sent or None


# Looks a collection id up: (tenant, database) of the collection, None if it does not exist.
Owner = Callable[[str, str, str], Awaitable[tuple[str, str] | None]]


class Guard:
    """The tokens in force and the checks made with them. ``reload`` swaps the table in one
    assignment: a request sees the old table or the new one, never a mix."""

    def __init__(self, path: Path, admin_token: str | None, owner: Owner) -> None:
        self.path = path
        self._admin_token = admin_token
        self._owner = owner
        self._tokens = load_tokens(path, admin_token)  # TokenFileError stops the start
        self._stamp = _stamp(path)
        self._owners: LRUCache[str, tuple[str, str]] = LRUCache(maxsize=100_000)
        self._allowed: dict[tuple[str, Route], Token] = {}
        self.reloads = 0

    # --- the token table -----------------------------------------------------------------

    def reload(self, reason: str) -> bool:
        """Read the file again; on any error keep the tokens in force (and say why)."""
        try:
            tokens = load_tokens(self.path, self._admin_token)
        except TokenFileError as exc:
            log.error("tokens file not reloaded (%s): %s; the previous tokens stay", reason, exc)
            return False
        self._tokens, self._stamp = tokens, _stamp(self.path)
        self._allowed = {}
        self.reloads += 1
        log.info("tokens file reloaded (%s): %d tokens", reason, len(tokens))
        return True

    async def watch(self, interval_s: float = 1.0) -> None:
        """Reload when the file changes (mtime, size or inode: editors replace files)."""
        while True:
            await asyncio.sleep(interval_s)
            if await asyncio.to_thread(_stamp, self.path) != self._stamp:
                await asyncio.to_thread(self.reload, "the file changed")

    def token(self, request: web.BaseRequest) -> Token:
        """The request's token, or 401 (the reason is audited, the token never shown)."""
        return self._known(request, _digest(presented(request)))

    def _known(self, request: web.BaseRequest, digest: str | None) -> Token:
        found = None if digest is None else self._tokens.get(digest)
        if found is None:
            why = "no token" if digest is None else "unknown token"
            audit_event(request, "auth_failed", reason=why)
            raise Unauthorized(f"{why}: send Authorization: Bearer TOKEN or X-Chroma-Token")
        return found

    # --- authorization -------------------------------------------------------------------

    async def check(self, request: web.BaseRequest, route: Route) -> Token:
        """The request's token if it may make this request, else 401/403 (or 404 for a
        collection id that is not in the path's database).

        A yes is remembered by (token hash, route) until the tokens file is reloaded: the
        checks cost ~7 us a request (2-6% of a cache hit's cost, measured), and the same
        clients ask the same routes. Only hashes are kept, and only yeses (a refusal is
        audited every time). A collection's owner never changes (ids are not reused)."""
        digest = _digest(presented(request))
        table, allowed = self._tokens, self._allowed
        if digest is not None:
            found = allowed.get((digest, route))
            if found is not None:
                return found
        token = await self._check(request, route, self._known(request, digest))
        # Not if the file was reloaded while this check waited for an owner lookup.
        if digest is not None and self._tokens is table:
            if len(allowed) >= ALLOWED_MAX:
                allowed.clear()
            allowed[(digest, route)] = token
        return token

    async def _check(self, request: web.BaseRequest, route: Route, token: Token) -> Token:
        need = _needed(route)
        if _RANK[token.role] < _RANK[need]:
            self._refuse(request, token, f"{route.op} needs the {need} role")
        if token.role == "admin" or route.op in _OPEN_OPS:
            return token
        tenant, database = route.tenant or "", route.database or ""
        if route.op == "get_tenant":
            if not token.touches(tenant):
                self._refuse(request, token, f"tenant {tenant} is not in scope")
            return token
        if route.op == "list_databases" or route.op == "create_database":
            # Lists (or makes) the tenant's databases: all of them must be in scope.
            if not token.holds_tenant(tenant):
                self._refuse(request, token, f"tenant {tenant} is not wholly in scope")
            return token
        if route.op == "delete_database" and not token.holds_tenant(tenant):
            self._refuse(request, token, f"tenant {tenant} is not wholly in scope")
        if not token.covers(tenant, database):
            self._refuse(request, token, f"{tenant}/{database} is not in scope")
        if route.collection is not None and route.op not in BY_NAME:
            await self._check_owner(request, token, route.collection, tenant, database)
        return token

    async def _check_owner(
        self, request: web.BaseRequest, token: Token, sent: str, tenant: str, database: str
    ) -> None:
        # Routes spell an id canonically (proxy/routes.py): ``sent`` is the id itself, or no
        # id at all; only a miss of the cache needs to know which.
        cid = sent
        owner = self._owners.get(cid)
        if owner is None:
            if collection_id(cid) is None:
                # Not an id at all: refused as the primary would (and nothing to look up).
                raise BadRequest("Collection ID is not a valid UUIDv4")
            owner = await self._owner(cid, tenant, database)
            if owner is None:
                # Not in the path's database (the primary's by-id lookup is scoped, its record
                # paths are not): as if it did not exist, whether it does elsewhere or not.
                audit_event(request, "cross_scope", token=token.name, collection=cid)
                raise NotFound(f"Collection [{cid}] does not exist.")
            self._owners[cid] = owner
        if owner != (tenant, database):
            # Answer as if it did not exist: its id says nothing to anyone outside its scope.
            audit_event(request, "cross_scope", token=token.name, collection=cid)
            raise NotFound(f"Collection [{cid}] does not exist.")

    def _refuse(self, request: web.BaseRequest, token: Token, why: str) -> None:
        audit_event(request, "forbidden", token=token.name, reason=why)
        raise Forbidden(f"token {token.name}: {why}")


def _needed(route: Route) -> Role:
    if route.op in _OPEN_OPS:
        return "read"
    if route.kind is RouteClass.WRITE:
        return "write" if route.op in _WRITE_ROLE_OPS else "admin"
    if route.op == "unknown":
        return "admin"  # a path this proxy does not know may do anything on the primary
    return "read"


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


def audit_event(request: web.BaseRequest, event: str, **fields: Any) -> None:
    """One JSON line in the audit log (logger proxy.audit): never a token or auth header."""
    when = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")
    record = {"time": when, "event": event, "request_id": request_id(request),
              "peer": request.remote, "method": request.method, "path": request.rel_url.path,
              **fields}  # fmt: skip
    audit.info("%s", _json(record))


def _json(record: dict[str, Any]) -> str:
    return orjson.dumps(record).decode()


AUTH = web.AppKey("auth", Guard)
# The token a request was checked with (request[TOKEN]), for the audit log.
TOKEN = "replica_proxy.token"
