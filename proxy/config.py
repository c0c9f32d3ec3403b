"""The one typed configuration object, and how it is read.

Every key is a field of :class:`Config`. A key is set, from lowest to highest precedence, by its
default, the TOML file (``--config FILE``; top-level ``key = value``), the environment
(``REPLICA_PROXY_<KEY>``) and the command line (``--<key-with-dashes>``). The help text of each
field is the one place it is documented: ``--help``, the README table (``replica-proxy
config-docs``) and error messages are generated from it.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

ENV_PREFIX = "REPLICA_PROXY_"
MAX_WORKERS = 64  # proxy/ops/ledger.py has room for this many

LogLevel = Literal["debug", "info", "warning", "error"]
Consistency = Literal["strong", "session", "bounded", "eventual"]
Role = Literal["standalone", "builder", "replica"]
ReplicaSource = Literal["auto", "storage", "export"]


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and the value."""

    def __init__(self, key: str, value: object, reason: str) -> None:
        self.key = key
        super().__init__(f"{key}={value!r}: {reason}")


def _key(help_text: str, default: Any, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help_text, **extra})


@dataclass(frozen=True, slots=True)
class Config:
    """Validated settings of one proxy process. Units are in the names (_s, _bytes)."""

    primary_url: str | None = _key(
        "URL of the Chroma primary (http://host:port). Unset: start an embedded primary "
        "(`chroma run`) with its data under data_dir.",
        None,
        flag="--primary",
        metavar="URL",
    )
    primary_persist_path: str | None = _key(
        "The primary's persist directory (its chroma.sqlite3 and HNSW segments), readable "
        "by the proxy: a sidecar with the primary's volume mounted read-only. Set "
        "automatically for the embedded primary. With it, replicas are the primary's own HNSW "
        "graphs plus its log (replica_source storage): the primary's answers, every write "
        "visible within storage_poll_interval_s, no export.",
        None,
        metavar="DIR",
    )
    replica_source: ReplicaSource = _key(
        "Where replicas come from. storage: the primary's files (needs primary_persist_path; "
        "refuses to start without a readable Chroma 1.5 database there). export: paginated "
        "HTTP export and an independent build. auto: storage when primary_persist_path is "
        "set (or the primary is embedded), else export. A builder in storage mode publishes "
        "its takes and serves the log after them to replicas (builder_url).",
        "auto",
    )
    storage_poll_interval_s: float = _key(
        "Storage mode: how often the primary's log is polled (two short statements when "
        "nothing changed). Reads that must see a write wake the tailer at once.",
        0.1,
    )
    storage_overlay_max_rows: int = _key(
        "Storage mode: rows changed since a collection was taken from the primary's files "
        "before it is taken again (each applied batch copies the changed rows' records).",
        5000,
    )
    storage_wait_s: float = _key(
        "Storage mode: how long a strong read, or a session read after a write through this "
        "proxy, waits for its replica to apply the primary's log up to the read's position "
        "before it is forwarded instead.",
        1.0,
    )
    export_overlay_max_rows: int = _key(
        "Export mode: each write this proxy forwards is applied to its replica once the "
        "primary acknowledged it, so reads that must see it stay local; when the writes have "
        "changed this many rows the replica is rebuilt. Concurrent writes to the same rows "
        "or adding rows, writes through other workers or hosts, and failed writes fall back "
        "to rebuilds. 0 turns this off.",
        5000,
    )
    listen: str = _key("HOST:PORT the proxy listens on.", "127.0.0.1:8000", metavar="HOST:PORT")
    data_dir: str = _key(
        "Directory for the proxy's state (the embedded primary's data and log).",
        "./replica-data",
    )
    sample_data: bool = _key(
        "Load the small `colors` sample collection into the primary at start-up if it is "
        "not there yet (for trying the proxy out).",
        False,
    )
    connect_timeout_s: float = _key("Timeout for opening a connection to the primary.", 5.0)
    read_timeout_s: float = _key(
        "Longest wait for the next bytes of a primary response (0 = no limit).", 60.0
    )
    max_upstream_connections: int = _key(
        "Most connections the proxy opens to the primary at once; more requests wait for one.",
        100,
    )
    max_body_bytes: int = _key(
        "Largest request body accepted; larger ones get 413 before anything reaches the "
        "primary. The default is Chroma's own limit (its max_payload_size_bytes), which it "
        "enforces by cutting the connection mid-upload; raise both together.",
        40 * 1024 * 1024,
    )
    max_ids_per_request: int = _key(
        "Most ids in one request (get, delete, add...): more is a 400. The Python client "
        "writes in batches of at most 5,461.",
        100_000,
    )
    max_n_results: int = _key("Largest n_results of a query: more is a 400.", 100_000)
    max_query_vectors: int = _key("Most query vectors in one query: more is a 400.", 10_000)
    max_where_depth: int = _key(
        "Deepest nesting of a where or where_document filter: deeper is a 400.", 64
    )
    max_where_nodes: int = _key(
        "Most parts (operators, keys, values) in one filter: more is a 400.", 10_000
    )
    max_document_bytes: int = _key(
        "Largest document in a write, UTF-8 bytes: larger is a 413.",
        4 * 1024 * 1024,
    )
    max_metadata_bytes: int = _key(
        "Largest metadata of one row in a write, as JSON bytes: larger is a 413.", 1024 * 1024
    )
    max_header_bytes: int = _key(
        "Longest request line (method and URL) or header (name and value), in bytes: longer "
        "is a 431. The Chroma clients send a few short headers; a token is under 100 bytes.",
        16 * 1024,
    )
    max_headers: int = _key(
        "Most headers in one request: more is a 431. The Chroma clients send under ten; the "
        "primary answers 431 past 100, and a forwarded request carries a few more than it came "
        "with (X-Forwarded-For, X-Request-Id...).",
        64,
    )
    heartbeat_interval_s: float = _key(
        "How often the primary is probed for /readyz and the primary_up metric.", 2.0
    )
    shutdown_delay_s: float = _key(
        "On SIGTERM, how long to keep serving with /readyz failing before draining, so a "
        "load balancer stops sending new requests first.",
        0.0,
    )
    drain_timeout_s: float = _key(
        "On SIGTERM, how long in-flight requests may take to finish before they are cancelled.",
        30.0,
    )
    embedded_start_timeout_s: float = _key(
        "How long to wait for the embedded primary to answer its first heartbeat.", 60.0
    )
    replicas: bool = _key(
        "Answer reads from local replicas. Off: forward every request to the primary.", True
    )
    consistency: Consistency = _key(
        "Default read consistency. strong: always the primary. session: a replica only if it "
        "includes every write this proxy forwarded for the collection and is at most "
        "max_staleness_s old. bounded: a replica at most max_staleness_s old. eventual: any "
        "replica. A request can choose its own with the header X-Proxy-Consistency.",
        "session",
    )
    max_staleness_s: float = _key(
        "Oldest replica (time since its export started) that session and bounded reads use.",
        300.0,
    )
    refresh_interval_s: float = _key(
        "Re-export a replica this long after its last export even without known writes "
        "(picks up writes that did not go through this proxy). At most max_staleness_s.",
        120.0,
    )
    rebuild_debounce_s: float = _key(
        "After a write through the proxy, rebuild the collection's replica once writes to it "
        "have paused this long.",
        1.0,
    )
    replicate: str = _key(
        "Comma-separated tenant/database list whose collections get replicas at start-up "
        "(database * = all of the tenant's). Empty: none at start-up.",
        "default_tenant/default_database",
    )
    replicate_on_demand: bool = _key(
        "Also build a replica of any other collection when it is first read.", True
    )
    snapshot_dir: str | None = _key(
        "Where snapshots are published. Unset: <data_dir>/snapshots.", None, metavar="DIR"
    )
    keep_snapshots: int = _key("Snapshots kept per collection (older ones are deleted).", 2)
    role: Role = _key(
        "standalone: export from the primary, build, publish and serve replicas. builder: "
        "export, build and publish snapshots to snapshot_dir for replica processes (in "
        "storage mode: take, publish and serve the log after each take); serve none (reads "
        "are forwarded). replica: serve what a builder publishes in snapshot_dir (a shared "
        "volume), loading newer generations as they appear; never export.",
        "standalone",
    )
    builder_url: str | None = _key(
        "Role replica: the URL of a builder in storage mode (http://host:port). Its takes of "
        "the primary's storage are then followed through its log stream (/admin/log, with "
        "admin_token, which must be the builder's): the builder's graph and every write "
        "within about a poll, session and strong reads answered locally.",
        None,
        metavar="URL",
    )
    workers: int = _key(
        "Processes serving the listen address (SO_REUSEPORT; the kernel spreads connections "
        "over them). One event loop is what saturates first, so set it to the number of cores "
        "a proxy may use. The first process builds replicas (role standalone) and supervises; "
        "the others load each published snapshot, as role replica does, at the cost of one "
        "more copy of every replica's index and records in memory (vectors are shared). "
        "Writes are shared among them, so read-your-writes holds whichever process a request "
        "reaches.",
        1,
    )
    store_poll_interval_s: float = _key(
        "Role replica, and workers after the first: how often snapshot_dir is scanned for "
        "newer generations.",
        2.0,
    )
    validate_queries: int = _key(
        "Before a new replica serves, this many of its stored vectors are searched with HNSW "
        "and with exact search; 0 skips the check.",
        20,
    )
    validate_min_recall: float = _key(
        "Refuse a new replica whose recall@10 in that check is below this (a corrupt or "
        "mismatched index scores near 0).",
        0.5,
    )
    admin_token: str | None = _key(
        "Token for the admin API under /admin/ (header Authorization: Bearer TOKEN). Unset: "
        "the admin API is off (403). With tokens_file it is one more token, with the admin "
        "role. Prefer the environment variable to the command line.",
        None,
        metavar="TOKEN",
    )
    tokens_file: str | None = _key(
        "TOML file of client tokens ([tokens.NAME] with sha256, role read|write|admin, "
        'scopes ["tenant/database", ...], * = any). Set: every request needs one '
        "(Authorization: Bearer TOKEN or X-Chroma-Token), checked before anything answers; "
        "the file is reloaded when it changes and on SIGHUP.",
        None,
        metavar="FILE",
    )
    audit_log_file: str | None = _key(
        "Write the audit log (JSON lines: auth failures, refusals, admin actions, resets and "
        "deletes, with the token's name, never the token) to this file instead of the main "
        "log. Reopened when it is moved or removed (logrotate).",
        None,
        metavar="FILE",
    )
    tls_cert_file: str | None = _key(
        "PEM certificate (chain) of the HTTPS listener; with tls_key_file. Unset: plain "
        "HTTP. Reloaded on SIGHUP.",
        None,
        metavar="FILE",
    )
    tls_key_file: str | None = _key(
        "PEM private key of tls_cert_file (unset: the key is in tls_cert_file).",
        None,
        metavar="FILE",
    )
    tls_client_ca_file: str | None = _key(
        "Require client certificates signed by this CA (mTLS); needs tls_cert_file.",
        None,
        metavar="FILE",
    )
    primary_ca_file: str | None = _key(
        "CA bundle that verifies an https primary_url (unset: the system's CAs).",
        None,
        metavar="FILE",
    )
    primary_tls_verify: bool = _key(
        "Verify the certificate of an https primary_url. Off only for testing.", True
    )
    allow_unauthenticated: bool = _key(
        "Listen on an address other than loopback without tokens_file (anyone who reaches "
        "the proxy can then read, change and delete everything: Chroma 1.5.9 checks nothing).",
        False,
    )
    export_page_rows: int = _key(
        "Rows per page when exporting a collection from the primary (at most 32766).", 250
    )
    export_concurrency: int = _key("Export pages fetched at once.", 4)
    build_threads: int = _key("Threads hnswlib uses to build an index.", 1)
    exact_search_max_rows: int = _key(
        "A filtered query searches exactly (brute force) when at most this many rows, or 10% "
        "of the collection, pass the filter; otherwise HNSW with over-fetch.",
        4096,
    )
    cache_max_bytes: int = _key(
        "Result cache size: total bytes of cached response bodies (0 turns the cache off).",
        256 * 1024 * 1024,
    )
    cache_max_entry_bytes: int = _key("Largest response body the cache stores.", 1024 * 1024)
    cache_ttl_s: float = _key(
        "Longest a cached replica answer is kept. Entries are also invalidated by writes "
        "through the proxy and by replica swaps.",
        300.0,
    )
    forwarded_cache_ttl_s: float = _key(
        "How long cacheable forwarded reads (collection lists, lookups and counts, tenant and "
        "database lookups, version, pre-flight) are reused (0 = not cached). Any write through "
        "the proxy invalidates them.",
        1.0,
    )
    max_concurrent_searches: int = _key(
        "Local searches running at once per worker process, one thread each (0 = the CPU cores "
        "shared among the workers, at least one each). Cache hits do not count.",
        0,
    )
    search_batch_max: int = _key(
        "Most queued unfiltered queries of one collection answered by one hnswlib call "
        "(batches form only while every search thread is busy; 1 = never batch).",
        16,
    )
    gil_switch_interval_ms: float = _key(
        "How long a thread holding the GIL runs before a waiting one gets it "
        "(sys.setswitchinterval). Python's 5 ms default lets search and build threads keep "
        "the event loop waiting; 0.5 ms gave +30% goodput under overload and 3-7% more "
        "searches/s (bench/guards.py).",
        0.5,
    )
    search_queue_max: int = _key(
        "Local searches that may wait for a slot; beyond, requests get 503 at once.", 256
    )
    search_queue_timeout_s: float = _key(
        "Longest a local search waits for a slot before it gets 503.", 1.0
    )
    max_requests_in_flight: int = _key(
        "Requests (of any kind but the ops endpoints) handled at once; beyond, 503 at once, "
        "before the body is read, like uvicorn's limit_concurrency. A memory guard against "
        "connection floods: keep it above the expected number of client connections, since "
        "under overload refusing costs the event loop nearly as much as serving.",
        1024,
    )
    max_forwarded_in_flight: int = _key(
        "Requests forwarded to the primary at once; beyond, requests get 503 at once.", 256
    )
    tenant_rate_per_s: float = _key(
        "Per-tenant request rate (token bucket); over it, 429. 0 turns it off.", 0.0
    )
    tenant_burst: int = _key("Per-tenant burst: requests allowed at once above the rate.", 100)
    breaker_failures: int = _key(
        "Consecutive failures to reach the primary that open the circuit breaker.", 5
    )
    breaker_open_s: float = _key(
        "How long an open breaker fails forwarded requests fast (503) before a trial request; "
        "local reads keep serving meanwhile.",
        5.0,
    )
    retry_after_s: int = _key("Retry-After (seconds) sent with 503s from admission control.", 1)
    log_level: LogLevel = _key("Log level: debug, info, warning or error.", "info")
    access_log: bool = _key("Write one access log line per request (logger proxy.access).", True)

    def __post_init__(self) -> None:
        if self.primary_url is not None:
            _check_url("primary_url", self.primary_url)
        if self.builder_url is not None:
            _check_url("builder_url", self.builder_url)
        parse_listen(self.listen)
        for name in ("connect_timeout_s", "heartbeat_interval_s", "embedded_start_timeout_s"):
            _check_positive(name, getattr(self, name))
        for name in ("read_timeout_s", "shutdown_delay_s", "drain_timeout_s"):
            if getattr(self, name) < 0:
                raise ConfigError(name, getattr(self, name), "must be >= 0")
        for name in (
            "max_upstream_connections",
            "max_body_bytes",
            "max_staleness_s",
            "refresh_interval_s",
            "keep_snapshots",
            "export_page_rows",
            "export_concurrency",
            "build_threads",
            "exact_search_max_rows",
            "cache_max_entry_bytes",
            "search_queue_timeout_s",
            "max_forwarded_in_flight",
            "max_requests_in_flight",
            "tenant_burst",
            "breaker_failures",
            "breaker_open_s",
            "retry_after_s",
            "store_poll_interval_s",
            "search_batch_max",
            "gil_switch_interval_ms",
            "storage_poll_interval_s",
            "storage_wait_s",
            "storage_overlay_max_rows",
            "max_ids_per_request",
            "max_n_results",
            "max_query_vectors",
            "max_where_depth",
            "max_where_nodes",
            "max_document_bytes",
            "max_metadata_bytes",
            "max_header_bytes",
            "max_headers",
        ):
            _check_positive(name, getattr(self, name))
        for name in (
            "cache_max_bytes",
            "cache_ttl_s",
            "forwarded_cache_ttl_s",
            "max_concurrent_searches",
            "search_queue_max",
            "tenant_rate_per_s",
            "validate_queries",
            "export_overlay_max_rows",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(name, getattr(self, name), "must be >= 0")
        if self.rebuild_debounce_s < 0:
            raise ConfigError("rebuild_debounce_s", self.rebuild_debounce_s, "must be >= 0")
        if self.refresh_interval_s > self.max_staleness_s:
            raise ConfigError(
                "refresh_interval_s",
                self.refresh_interval_s,
                f"must be at most max_staleness_s ({self.max_staleness_s:g}), or session reads "
                "would go to the primary between refreshes",
            )
        if self.export_page_rows > 32766:  # Chroma: "too many SQL variables" beyond
            raise ConfigError("export_page_rows", self.export_page_rows, "must be <= 32766")
        if not 0 <= self.validate_min_recall <= 1:
            raise ConfigError("validate_min_recall", self.validate_min_recall, "must be in [0, 1]")
        if self.role != "standalone" and not self.replicas:
            raise ConfigError("role", self.role, "needs replicas on")
        if not 1 <= self.workers <= MAX_WORKERS:
            raise ConfigError("workers", self.workers, f"must be between 1 and {MAX_WORKERS}")
        if self.workers > 1 and self.role == "builder":
            raise ConfigError("workers", self.workers, "a builder serves no reads: use 1")
        if self.admin_token is not None and len(self.admin_token) < 16:
            raise ConfigError("admin_token", "...", "must be at least 16 characters")
        if not (self.tokens_file or self.allow_unauthenticated or _loopback(self.host)):
            raise ConfigError(
                "listen",
                self.listen,
                "without tokens_file anyone who reaches it can read, change and delete all "
                "data: set tokens_file, listen on loopback, or pass --allow-unauthenticated",
            )
        if self.tls_cert_file is None and (self.tls_key_file or self.tls_client_ca_file):
            raise ConfigError("tls_cert_file", None, "tls_key_file and mTLS need a certificate")
        if self.builder_url is not None and (self.role != "replica" or not self.admin_token):
            raise ConfigError("builder_url", self.builder_url, "needs role replica and admin_token")
        if (
            self.replica_source == "storage"
            and self.primary_persist_path is None
            and self.primary_url is not None
        ):
            raise ConfigError(
                "replica_source", "storage", "needs primary_persist_path (or no primary_url)"
            )
        for spec in self.replicate_list:
            if spec.count("/") != 1 or not all(spec.split("/")):
                raise ConfigError("replicate", self.replicate, "expected tenant/database,...")

    @property
    def storage_mode(self) -> bool:
        """Replicas follow the primary's files (sync/tailer.py) rather than exports."""
        if self.replica_source == "export" or not self.replicas:
            return False
        return self.primary_persist_path is not None

    @property
    def replicate_list(self) -> tuple[str, ...]:
        return tuple(s.strip() for s in self.replicate.split(",") if s.strip())

    @property
    def snapshot_path(self) -> Path:
        return Path(self.snapshot_dir) if self.snapshot_dir else Path(self.data_dir) / "snapshots"

    @property
    def search_slots(self) -> int:
        # One thread per core in all: with two workers on two cores, two threads each cost
        # 7% of the replica path's throughput (bench/guards.py --workers 2).
        return self.max_concurrent_searches or max(1, (os.cpu_count() or 2) // self.workers)

    @property
    def host(self) -> str:
        return parse_listen(self.listen)[0]

    @property
    def port(self) -> int:
        return parse_listen(self.listen)[1]


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def _check_positive(key: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(key, value, "must be > 0")


def _check_url(key: str, value: str) -> None:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(key, value, "expected http://HOST:PORT or https://HOST:PORT")
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise ConfigError(key, value, str(exc)) from None
    if parts.path not in ("", "/") or parts.query:
        raise ConfigError(key, value, "the URL takes no path or query")


def parse_listen(value: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[::1]:PORT`` for IPv6); raise ConfigError when malformed."""
    match = re.fullmatch(r"\[?([^\[\]]*?)\]?:(\d{1,5})", value)
    if match is None or not match.group(1) or int(match.group(2)) > 65535:
        raise ConfigError("listen", value, "expected HOST:PORT, e.g. 127.0.0.1:8000")
    return match.group(1), int(match.group(2))


# --- reading -------------------------------------------------------------------------------

FIELDS = {f.name: f for f in dataclasses.fields(Config)}
_HINTS = typing.get_type_hints(Config)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20}
_SIZE_UNITS |= {"g": 1 << 30, "gib": 1 << 30}


def field_type(name: str) -> Any:
    """The declared type with ``| None`` removed."""
    hint = _HINTS[name]
    if isinstance(hint, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0]
    return hint


def flag_name(name: str) -> str:
    return str(FIELDS[name].metadata.get("flag", "--" + name.replace("_", "-")))


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def convert(name: str, raw: object) -> object:
    """Turn a raw value (a string from the environment or a flag, or a TOML value) into the
    field's type, raising ConfigError naming the key when it does not fit."""
    kind = field_type(name)
    if raw == "" and _HINTS[name] != kind:
        return None  # an empty string clears an optional key
    try:
        return _convert(kind, raw, is_bytes=name.endswith("_bytes"))
    except (ValueError, TypeError) as exc:
        raise ConfigError(name, raw, str(exc) or "invalid value") from None


def _convert(kind: Any, raw: object, *, is_bytes: bool) -> object:
    if typing.get_origin(kind) is Literal:
        choices = typing.get_args(kind)
        if raw not in choices:
            raise ValueError("expected one of " + ", ".join(map(str, choices)))
        return raw
    if kind is bool:
        return _to_bool(raw)
    if kind is int and is_bytes and isinstance(raw, str):
        return _to_size(raw)
    if kind is int and isinstance(raw, (bool, float)):
        raise ValueError("expected a whole number")
    if kind is int:
        return _number(int, raw, "expected a whole number")
    if kind is float:
        return _number(float, raw, "expected a number")
    if kind is str:
        return str(raw)
    raise TypeError(f"unsupported config type {kind!r}")  # pragma: no cover


def _number(kind: type[int] | type[float], raw: object, message: str) -> int | float:
    try:
        return kind(raw)  # type: ignore[call-overload,arg-type]
    except (TypeError, ValueError):
        raise ValueError(message) from None


def _to_bool(raw: object) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _to_size(raw: str) -> int:
    match = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", raw)
    if match is None or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError("expected a byte count such as 41943040, 40MiB or 512KiB")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]


def read_toml(path: str) -> dict[str, object]:
    """Read a config file; unknown keys are errors so that a typo is not silently ignored."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError("config", path, exc.strerror or str(exc)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", path, f"not valid TOML: {exc}") from None
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise ConfigError(unknown[0], data[unknown[0]], "unknown key in config file")
    return data


def read_env(environ: Mapping[str, str]) -> dict[str, object]:
    """Pick ``REPLICA_PROXY_*`` variables; unknown ones are errors, like unknown TOML keys."""
    found: dict[str, object] = {}
    for var, value in environ.items():
        if not var.startswith(ENV_PREFIX) or var == ENV_PREFIX + "CONFIG":
            continue
        name = var[len(ENV_PREFIX) :].lower()
        if name not in FIELDS:
            raise ConfigError(var, value, "unknown environment variable")
        found[name] = value
    return found


def load(
    flags: Mapping[str, object],
    environ: Mapping[str, str] | None = None,
    config_file: str | None = None,
) -> Config:
    """Build the Config from file < environment < flags. Raises ConfigError."""
    environ = os.environ if environ is None else environ
    config_file = config_file or environ.get(ENV_PREFIX + "CONFIG") or None
    layers = [read_toml(config_file) if config_file else {}, read_env(environ), dict(flags)]
    values: dict[str, object] = {}
    for layer in layers:
        for name, raw in layer.items():
            values[name] = convert(name, raw)
    return Config(**values)  # type: ignore[arg-type]  # convert() checked each type


def _toml_literal(value: object) -> str:
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, int) and value >= 1 << 20 and value % (1 << 20) == 0:
        return f'"{value >> 20}MiB"'
    return repr(value)


def docs_table() -> str:
    """The README's configuration table, generated so it cannot drift from the code."""
    rows = ["| key (TOML) / flag / environment | default | meaning |", "|---|---|---|"]
    for name, f in FIELDS.items():
        rows.append(
            f"| `{name}`<br>`{flag_name(name)}`<br>`{env_name(name)}` "
            f"| `{_toml_literal(f.default)}` | {f.metadata['help']} |"
        )
    return "\n".join(rows) + "\n"
