"""A real haproxy (Debian's package) in front of proxy processes, for the rolling-restart test.

``HAProxy(servers, work_dir).start()`` writes a config to ``work_dir/haproxy.cfg`` and runs
``haproxy -db`` (foreground) as a child process on a free loopback port, logging every request
and health-check transition to ``work_dir/haproxy.log``; ``stop()`` ends it by pid. The
servers' states as haproxy sees them come from its stats socket (``show stat``).

Health checks are ``GET /readyz`` every ``check_interval_ms``; one failure marks a server down
and ``rise`` successes mark it up again. Every response carries ``X-LB-Server`` (the haproxy
server name that answered it) so a test can tell the backends apart.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import socket
import subprocess
from pathlib import Path
from typing import IO

from proxy.primary.embedded import free_port, stop_process
from tests.helpers import wait_until

SERVER_HEADER = "X-LB-Server"
BACKEND = "proxies"


def haproxy_executable() -> str | None:
    """haproxy on PATH, else where Debian installs it (/usr/sbin is not on every PATH)."""
    found = shutil.which("haproxy")
    if found:
        return found
    for candidate in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


class HAProxy:
    """One haproxy process balancing ``servers`` (name -> port on 127.0.0.1) round robin."""

    def __init__(
        self,
        servers: dict[str, int],
        work_dir: Path,
        *,
        check_interval_ms: int = 200,
        rise: int = 2,
        fall: int = 1,
    ) -> None:
        executable = haproxy_executable()
        if executable is None:
            raise RuntimeError("haproxy not found (make haproxy installs it)")
        self.executable = executable
        self.servers = dict(servers)
        self.work_dir = work_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = work_dir / "haproxy.cfg"
        self.log_path = work_dir / "haproxy.log"
        self.socket_path = work_dir / "haproxy.sock"
        if len(str(self.socket_path)) > 100:  # sun_path holds 108 bytes
            raise RuntimeError(f"stats socket path too long: {self.socket_path}")
        self.check_interval_ms = check_interval_ms
        self.rise = rise
        self.fall = fall
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def config(self) -> str:
        servers = "\n".join(
            f"    server {name} 127.0.0.1:{port} check" for name, port in self.servers.items()
        )
        return f"""\
global
    log stderr format raw local0 info
    stats socket {self.socket_path} mode 600 level admin
    maxconn 1024

defaults
    mode http
    log global
    option httplog
    option log-health-checks
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 30s
    # No retries and no redispatch: a request that reached a proxy which then failed it (or
    # refused its connection) must show up as a failure, not be hidden by a second try. The
    # proxies are supposed to drain correctly on their own: readiness off, keep serving for
    # shutdown_delay_s while haproxy's health check takes them out, then finish what is in
    # flight.
    retries 0
    option http-keep-alive

frontend clients
    bind 127.0.0.1:{self.port}
    default_backend {BACKEND}

backend {BACKEND}
    balance roundrobin
    option httpchk GET /readyz
    http-check expect status 200
    default-server inter {self.check_interval_ms}ms fall {self.fall} rise {self.rise}
    http-response set-header {SERVER_HEADER} %[srv_name]
{servers}
"""

    def start(self) -> HAProxy:
        self.config_path.write_text(self.config())
        check = subprocess.run(
            [self.executable, "-c", "-f", str(self.config_path)],
            capture_output=True,
            text=True,
            check=False,
        )
        if check.returncode != 0:
            raise RuntimeError(f"haproxy refused its config: {check.stdout}{check.stderr}")
        self._log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [self.executable, "-db", "-f", str(self.config_path)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        wait_until(self._answers, 15, f"haproxy on {self.url}")
        return self

    def _answers(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"haproxy exited with {self.proc.returncode}: {self.logs()[-2000:]}")
        try:
            self.server_states()
        except OSError:
            return False
        return True

    def _command(self, command: str) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(self.socket_path))
            sock.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def server_states(self) -> dict[str, str]:
        """Server name -> haproxy's status for it (``UP``, ``DOWN``, ``UP 1/2``, ...)."""
        text = self._command("show stat").lstrip("# ")
        states = {}
        for row in csv.DictReader(io.StringIO(text)):
            if row["pxname"] == BACKEND and row["svname"] in self.servers:
                states[row["svname"]] = row["status"]
        return states

    def wait_state(self, server: str, state: str, timeout_s: float = 15.0) -> None:
        wait_until(
            lambda: self.server_states().get(server) == state,
            timeout_s,
            f"haproxy to see {server} {state}",
        )

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 10)
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
