"""Real processes for the tests: a Chroma server (`chroma run`) and the proxy itself.

Both run on free loopback ports and are stopped by pid. Waiting is always on a condition with a
deadline, never a fixed sleep.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import IO

from proxy.primary.embedded import chroma_executable, free_port, stop_process

BIN = Path(sys.executable).parent


def wait_until(predicate: Callable[[], bool], timeout_s: float = 30.0, what: str = "") -> None:
    """Poll ``predicate`` every 50 ms until it is true; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s}s waiting for {what or predicate}")
        time.sleep(0.05)


def http_status(url: str, timeout_s: float = 2.0) -> int | None:
    """Status of a GET, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            status: int = resp.status
            return status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return None


class ChromaServer:
    """`chroma run` from the pinned chromadb, on a free port, data in ``path``."""

    def __init__(self, path: Path, port: int | None = None) -> None:
        self.path = path
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ChromaServer:
        self.path.mkdir(parents=True, exist_ok=True)
        log = open(self.path.parent / f"chroma-{self.port}.log", "ab")  # noqa: SIM115
        argv = [chroma_executable(), "run", "--path", str(self.path)]
        self.proc = subprocess.Popen(
            [*argv, "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "ANONYMIZED_TELEMETRY": "False"},
        )
        log.close()
        wait_until(self._answers, 60, f"chroma on {self.url}")
        return self

    def _answers(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"chroma exited with {self.proc.returncode}")
        return http_status(self.url + "/api/v2/heartbeat") == 200

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 15)
        self.proc = None


_BANNER = re.compile(
    rb"serving on (https?)://([\d.]+):(\d+)(?: with \d+ workers)? -> (\w+) primary (\S+)"
)


class ProxyProcess:
    """`replica-proxy serve ...` as a child process; the bound port is read from its banner."""

    def __init__(self, *args: str, log_dir: Path, env: dict[str, str] | None = None) -> None:
        argv = [str(BIN / "replica-proxy"), "serve", "--listen", "127.0.0.1:0", *args]
        self.log_path = log_dir / f"proxy-{time.monotonic_ns()}.log"
        self._log: IO[bytes] = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=self._log,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
        )
        try:
            self.banner = self._read_banner(90.0)
        except BaseException:
            self.stop()
            raise
        match = _BANNER.search(self.banner)
        assert match is not None, self.banner
        self.port = int(match.group(3))
        self.url = f"{match.group(1).decode()}://127.0.0.1:{self.port}"
        self.primary_url = match.group(5).decode()

    def _read_banner(self, timeout_s: float) -> bytes:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        out = b""
        deadline = time.monotonic() + timeout_s
        while b"Stop: Ctrl-C" not in out:
            ready, _, _ = select.select([fd], [], [], max(deadline - time.monotonic(), 0))
            chunk = os.read(fd, 4096) if ready else b""
            if not chunk:
                raise RuntimeError(f"proxy did not start: {out!r} {self.logs()}")
            out += chunk
        return out

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout_s: float = 30.0) -> int:
        return self.proc.wait(timeout_s)

    def stop(self) -> int:
        stop_process(self.proc, 30)
        self._log.close()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode


def peak_rss_bytes(pid: int) -> int:
    """The process' peak resident set size (VmHWM) so far."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def pids_running(pattern: str) -> list[int]:
    """Pids whose command line contains ``pattern``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if pattern.encode() in cmdline:
                found.append(int(entry.name))
    return found


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie still has a pid; it is gone for our purposes.
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.split(")")[-1].split()[0] == "Z"


def kill(pid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
