"""An embedded Chroma primary: `chroma run` from the installed chromadb, for the one-command demo.

The child runs in its own session (a Ctrl-C in the terminal reaches only the proxy, which drains
first and then stops the primary), and on Linux is told to exit if the proxy dies without
cleaning up, so a `kill -9` of the proxy leaves no orphan server holding the data directory.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp


class EmbeddedPrimaryError(RuntimeError):
    """The embedded primary could not be started."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def chroma_executable() -> str:
    """The `chroma` CLI beside this interpreter (the project's venv), else on PATH."""
    beside = Path(sys.executable).with_name("chroma")
    if beside.exists():
        return str(beside)
    found = shutil.which("chroma")
    if found is None:
        raise EmbeddedPrimaryError("the `chroma` command was not found; install chromadb==1.5.9")
    return found


def _exit_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    PR_SET_PDEATHSIG = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class EmbeddedPrimary:
    """``async with EmbeddedPrimary(dir) as p:`` runs `chroma run` on a free loopback port."""

    def __init__(self, data_dir: Path, start_timeout_s: float = 60.0) -> None:
        data_dir = data_dir.absolute()
        self.path = data_dir / "primary"
        self.log_path = data_dir / "primary.log"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._start_timeout_s = start_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    async def __aenter__(self) -> EmbeddedPrimary:
        self.path.mkdir(parents=True, exist_ok=True)
        argv = [chroma_executable(), "run", "--path", str(self.path)]
        argv += ["--host", "127.0.0.1", "--port", str(self.port)]
        env = {**os.environ, "ANONYMIZED_TELEMETRY": "False"}
        # Spawned on the loop's own thread on purpose: PR_SET_PDEATHSIG fires when the thread
        # that forked the child exits, and this one lives as long as the proxy.
        with open(self.log_path, "ab") as logfile:  # noqa: ASYNC230 - opening a log is instant
            self._proc = subprocess.Popen(  # noqa: ASYNC220
                argv,
                stdin=subprocess.DEVNULL,
                stdout=logfile,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=_exit_with_parent if sys.platform == "linux" else None,
            )
        try:
            await self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await asyncio.to_thread(self.stop)

    async def _wait_ready(self) -> None:
        deadline = time.monotonic() + self._start_timeout_s
        timeout = aiohttp.ClientTimeout(total=2)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while time.monotonic() < deadline:
                assert self._proc is not None
                if self._proc.poll() is not None:
                    raise EmbeddedPrimaryError(
                        f"`chroma run` exited with code {self._proc.returncode}; "
                        f"see {self.log_path}"
                    )
                try:
                    async with session.get(self.url + "/api/v2/heartbeat") as resp:
                        if resp.status == 200:
                            return
                except (aiohttp.ClientError, TimeoutError):
                    pass
                await asyncio.sleep(0.1)
        raise EmbeddedPrimaryError(
            f"`chroma run` did not answer within {self._start_timeout_s:g}s; see {self.log_path}"
        )

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM, then SIGKILL if it does not exit in time. Blocking; idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_process(proc, timeout_s)


def stop_process(proc: subprocess.Popen[Any], timeout_s: float) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout_s``. Blocking."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
