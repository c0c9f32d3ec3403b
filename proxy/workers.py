"""Worker processes: with ``workers = N`` one proxy serves its listen address from N processes.

Why: a process answers from one event loop, and that loop saturates long before the cores do
(bench/guards.py: a cache hit is ~75 us of loop time; the searches release the GIL).

How:
* Every process binds the address with SO_REUSEPORT; the kernel spreads new connections over
  them (a keep-alive connection stays with the process that accepted it).
* Worker 0, the process that was started, is the proxy as configured: in role standalone it
  exports, builds, publishes and serves replicas. Workers 1..N-1 follow the snapshot store
  as role replica does, so one export and one build serve every worker.
* Forwarded writes are counted in a shared ledger (proxy/ledger.py): read-your-writes and the
  cache's invalidation hold whichever worker a request reaches, and worker 0 rebuilds after a
  write that another worker forwarded (relay_writes).
* Worker 0 supervises: a worker that exits unexpectedly is started again; on SIGTERM it
  passes the signal on and every worker drains on its own; the workers get SIGTERM if worker
  0 dies (PR_SET_PDEATHSIG), so none is left holding the port.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from index.holder import ReplicaSet
from sync.scheduler import RebuildScheduler

from .config import Config
from .ledger import LISTENING, READY, STARTING, Ledger

log = logging.getLogger(__name__)

RESTART_DELAY_S = 1.0
_PR_SET_PDEATHSIG = 1


def new_ledger(config: Config) -> Ledger:
    """The workers' ledger: in memory (/dev/shm) where there is one."""
    shm = Path("/dev/shm")
    return Ledger.create(shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(config.data_dir))


def worker_config(config: Config, primary_url: str, listen: str) -> Config:
    """What workers 1..N-1 run: the same settings, following worker 0's snapshot store."""
    return dataclasses.replace(
        config,
        primary_url=primary_url,
        listen=listen,
        sample_data=False,
        role="replica" if config.replicas else config.role,
        snapshot_dir=str(config.snapshot_path),
    )


class Workers:
    """Worker 0's view of workers 1..N-1: start, restart, stop."""

    def __init__(self, config: Config, primary_url: str, listen: str, ledger: Ledger) -> None:
        self.count = config.workers
        self._config = worker_config(config, primary_url, listen)
        self._ledger = ledger
        self._procs: dict[int, subprocess.Popen[bytes]] = {}
        self._stopping = False

    def start(self) -> None:
        for index in range(1, self.count):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        settings = {f.name: getattr(self._config, f.name) for f in dataclasses.fields(Config)}
        # The settings go through stdin: the command line would show admin_token to `ps`.
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy.workers", str(index), str(self._ledger.fd)],
            stdin=subprocess.PIPE,
            pass_fds=(self._ledger.fd,),
            start_new_session=True,  # Ctrl-C reaches worker 0 only; it passes SIGTERM on
        )
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(settings).encode())
        proc.stdin.close()
        self._procs[index] = proc
        log.info("worker %d started (pid %d)", index, proc.pid)

    async def supervise(self) -> None:
        """Start again any worker that exits while the proxy is not shutting down."""
        while True:
            await asyncio.sleep(RESTART_DELAY_S)
            for index, proc in list(self._procs.items()):
                if proc.poll() is not None and not self._stopping:
                    log.error("worker %d exited (%s); starting it again", index, proc.returncode)
                    self._spawn(index)

    def signal(self) -> None:
        """Pass a shutdown signal on (a second one makes them cancel in-flight requests)."""
        self._stopping = True
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    async def wait(self, timeout_s: float) -> None:
        """Wait for the workers to finish draining; kill any still running after that."""
        for index, proc in self._procs.items():
            try:
                await asyncio.to_thread(proc.wait, timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("worker %d did not stop in %gs; killing it", index, timeout_s)
                proc.kill()
                await asyncio.to_thread(proc.wait)


async def relay_writes(
    ledger: Ledger, scheduler: RebuildScheduler, replicas: ReplicaSet, interval_s: float
) -> None:
    """Worker 0: a write that another worker forwarded asks for the same rebuild as one of
    its own (a collection's counter in the ledger moved)."""
    seen: dict[str, int] = {}
    while True:
        await asyncio.sleep(interval_s)
        for collection_id in scheduler.known():
            seq = ledger.seq(collection_id)
            last = seen.get(collection_id)
            if last is None:  # first look: compare with what the serving replica includes
                replica = replicas.get(collection_id)
                last = seq if replica is None else max(replica.covers_write_seq, 0)
            if seq != last:
                scheduler.notify_write(collection_id)
            seen[collection_id] = seq


async def publish_state(
    ledger: Ledger, index: int, is_ready: Callable[[], bool], interval_s: float
) -> None:
    """Keep this worker's state in the ledger current (and STARTING once it stops)."""
    try:
        while True:
            ledger.set_state(index, READY if is_ready() else LISTENING)
            await asyncio.sleep(interval_s)
    finally:
        ledger.set_state(index, STARTING)


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def main(argv: list[str]) -> int:
    """Entry point of workers 1..N-1: ``python -m proxy.workers INDEX LEDGER_FD`` with the
    settings as JSON on stdin."""
    _die_with_parent()
    index, inherited = int(argv[0]), int(argv[1])
    ledger = Ledger.open(Path(f"/proc/self/fd/{inherited}"))
    os.close(inherited)
    config = Config(**json.loads(sys.stdin.read()))
    from .cli import configure_logging, run_loop
    from .server import serve_worker

    configure_logging(config.log_level, index)
    run_loop(config, serve_worker(config, index, ledger))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
