"""replica-proxy: a read-replica caching proxy for Chroma."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("replica-proxy")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0+unknown"
