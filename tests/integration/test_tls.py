"""TLS (proxy/access/tls.py) with a CA and certificates made by the test (trustme): the HTTPS
listener, client certificates (mTLS), a certificate renewed and reloaded on SIGHUP, and TLS
to the primary, verified against a given CA."""

from __future__ import annotations

import signal
import ssl
from pathlib import Path

import httpx
import pytest
import trustme

from tests.helpers import ChromaServer, ProxyProcess, wait_until

HEARTBEAT = "/api/v2/heartbeat"


def _files(ca: trustme.CA, directory: Path, name: str = "server") -> tuple[str, str, str]:
    """(certificate chain, key, the CA's certificate) as PEM files for 127.0.0.1."""
    directory.mkdir(parents=True, exist_ok=True)
    cert = ca.issue_cert("127.0.0.1", "localhost")
    chain, key, authority = (
        directory / f"{name}.pem",
        directory / f"{name}.key",
        directory / "ca.pem",
    )
    cert.cert_chain_pems[0].write_to_path(str(chain))
    for extra in cert.cert_chain_pems[1:]:
        extra.write_to_path(str(chain), append=True)
    cert.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(authority))
    return str(chain), str(key), str(authority)


def _trusting(authority: str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=authority)


def _https(chroma: ChromaServer, tmp_path: Path, *args: str) -> ProxyProcess:
    return ProxyProcess("--primary", chroma.url, "--no-replicas",
                        "--data-dir", str(tmp_path / "data"), *args, log_dir=tmp_path)  # fmt: skip


def test_an_https_listener(chroma: ChromaServer, tmp_path: Path) -> None:
    chain, key, authority = _files(trustme.CA(), tmp_path / "tls")
    proxy = _https(chroma, tmp_path, "--tls-cert-file", chain, "--tls-key-file", key)
    try:
        assert proxy.url.startswith("https://")
        assert httpx.get(proxy.url + HEARTBEAT, verify=_trusting(authority)).status_code == 200
        with pytest.raises(httpx.ConnectError):  # not a certificate the system trusts
            httpx.get(proxy.url + HEARTBEAT)
        with pytest.raises(httpx.HTTPError):  # plain HTTP to the TLS port
            httpx.get(proxy.url.replace("https://", "http://") + HEARTBEAT)
    finally:
        assert proxy.stop() == 0, proxy.logs()


def test_mtls_refuses_a_client_without_a_certificate(chroma: ChromaServer, tmp_path: Path) -> None:
    ca = trustme.CA()
    chain, key, authority = _files(ca, tmp_path / "tls")
    proxy = _https(chroma, tmp_path, "--tls-cert-file", chain, "--tls-key-file", key,
                   "--tls-client-ca-file", authority)  # fmt: skip
    try:
        anonymous = ssl.create_default_context(cafile=authority)
        with pytest.raises(httpx.HTTPError):
            httpx.get(proxy.url + HEARTBEAT, verify=anonymous)
        known = ssl.create_default_context(cafile=authority)
        ca.issue_cert("client@example.com").configure_cert(known)
        assert httpx.get(proxy.url + HEARTBEAT, verify=known).status_code == 200
        stranger = ssl.create_default_context(cafile=authority)
        trustme.CA().issue_cert("client@example.com").configure_cert(stranger)
        with pytest.raises(httpx.HTTPError):
            httpx.get(proxy.url + HEARTBEAT, verify=stranger)
    finally:
        assert proxy.stop() == 0, proxy.logs()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_renewed_certificate_is_loaded_on_sighup(
    chroma: ChromaServer, tmp_path: Path, workers: int
) -> None:
    """With workers, the signal sent to the proxy's pid reaches every worker: each of 20 new
    connections (spread over them by the kernel) gets the new certificate."""
    chain, key, first = _files(trustme.CA(), tmp_path / "old")
    proxy = _https(chroma, tmp_path, "--tls-cert-file", chain, "--tls-key-file", key,
                   "--workers", str(workers))  # fmt: skip
    try:
        assert httpx.get(proxy.url + HEARTBEAT, verify=_trusting(first)).status_code == 200
        new_chain, new_key, second = _files(trustme.CA(), tmp_path / "new")
        Path(chain).write_bytes(Path(new_chain).read_bytes())
        Path(key).write_bytes(Path(new_key).read_bytes())
        proxy.signal(signal.SIGHUP)

        def renewed() -> bool:
            try:
                return httpx.get(proxy.url + HEARTBEAT, verify=_trusting(second)).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(renewed, 20, "the renewed certificate")
        wait_until(lambda: proxy.logs().count("TLS certificate reloaded") == workers, 20, "all")
        assert all(renewed() for _ in range(20))
    finally:
        assert proxy.stop() == 0, proxy.logs()


def test_tls_to_the_primary_is_verified(chroma: ChromaServer, tmp_path: Path) -> None:
    """A TLS front for the primary (another proxy, forwarding only); a proxy in front of it
    with the CA answers, one without it gets a clean 502 rather than trusting it."""
    chain, key, authority = _files(trustme.CA(), tmp_path / "tls")
    (tmp_path / "front").mkdir()
    front = _https(chroma, tmp_path / "front", "--tls-cert-file", chain, "--tls-key-file", key)
    trusting = ProxyProcess("--primary", front.url, "--primary-ca-file", authority,
                            "--no-replicas", "--data-dir", str(tmp_path / "t"),
                            log_dir=tmp_path)  # fmt: skip
    doubting = ProxyProcess("--primary", front.url, "--no-replicas",
                            "--data-dir", str(tmp_path / "d"), log_dir=tmp_path)  # fmt: skip
    try:
        assert httpx.get(trusting.url + HEARTBEAT).status_code == 200
        refused = httpx.get(doubting.url + HEARTBEAT)
        assert refused.status_code in (502, 503) and refused.json()["error"]
    finally:
        for proc in (trusting, doubting, front):
            assert proc.stop() == 0, proc.logs()
