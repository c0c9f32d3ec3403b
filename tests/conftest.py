"""Session-wide real servers: one Chroma primary and one proxy in front of it."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import ChromaServer, ProxyProcess


@pytest.fixture(scope="session")
def chroma(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChromaServer]:
    """A real `chroma run` shared by the session; tests use unique collection names."""
    server = ChromaServer(tmp_path_factory.mktemp("chroma") / "data").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def proxy(chroma: ChromaServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    """The proxy as a real process in front of the session's Chroma, default settings
    (replicas on, session consistency)."""
    log_dir = tmp_path_factory.mktemp("proxy")
    proc = ProxyProcess("--primary", chroma.url, "--data-dir", str(log_dir), log_dir=log_dir)
    yield proc
    assert proc.stop() == 0, proc.logs()


@pytest.fixture(scope="session")
def forwarding_proxy(
    chroma: ChromaServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    """A proxy with replicas off: every request is forwarded."""
    log_dir = tmp_path_factory.mktemp("forwarding-proxy")
    proc = ProxyProcess(
        "--primary", chroma.url, "--no-replicas", "--data-dir", str(log_dir), log_dir=log_dir
    )
    yield proc
    assert proc.stop() == 0, proc.logs()


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture
def name() -> str:
    """A collection name no other test uses."""
    return "t-" + uuid.uuid4().hex[:12]


@pytest.fixture(autouse=True, scope="module")
def _close_chroma_clients() -> Iterator[None]:
    """Close the HTTP sessions of every chromadb client a test module made. The clients share
    cached Systems that outlive them (one that failed in its constructor cannot even be
    closed), so their sockets were left to the garbage collector, which warned about them in
    whatever test it happened to run during."""
    yield
    from chromadb.api.shared_system_client import SharedSystemClient

    for system in SharedSystemClient._identifier_to_system.values():
        for component in system.components():
            session = getattr(component, "_session", None)
            if isinstance(session, httpx.Client):
                session.close()
    SharedSystemClient.clear_system_cache()
