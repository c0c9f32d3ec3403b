"""TLS: the proxy's HTTPS listener (optionally requiring client certificates) and TLS to the
primary (issue 12). Plain HTTP stays the default: the embedded primary and loopback need
none."""

from __future__ import annotations

import logging
import ssl

from aiohttp import web

from proxy.config import Config

log = logging.getLogger(__name__)


def server_context(config: Config) -> ssl.SSLContext | None:
    """The listener's context (None: plain HTTP). With tls_client_ca_file, a client must
    present a certificate that CA signed (mTLS)."""
    if config.tls_cert_file is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(context, config)
    if config.tls_client_ca_file is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=config.tls_client_ca_file)
    return context


def reload(context: ssl.SSLContext, config: Config) -> None:
    """Load the certificate and key again (SIGHUP, after a renewal): handshakes from now on
    use them, connections already open keep theirs. A pair that does not load is refused
    with the reason; the old one stays."""
    try:
        _load_chain(context, config)
    except (OSError, ssl.SSLError) as exc:
        log.error("TLS certificate not reloaded: %s; the previous one stays", exc)
        return
    log.info("TLS certificate reloaded from %s", config.tls_cert_file)


def _load_chain(context: ssl.SSLContext, config: Config) -> None:
    assert config.tls_cert_file is not None
    context.load_cert_chain(config.tls_cert_file, config.tls_key_file)


def primary_context(config: Config) -> ssl.SSLContext | bool:
    """For an https primary: verified against primary_ca_file (else the system's CAs), or
    not at all when primary_tls_verify is off (say so loudly). True: aiohttp's default."""
    if not config.primary_tls_verify:
        log.warning("TLS to the primary is not verified (primary_tls_verify off)")
        return False
    if config.primary_ca_file is None:
        return True
    return ssl.create_default_context(cafile=config.primary_ca_file)


TLS = web.AppKey("tls", ssl.SSLContext)
