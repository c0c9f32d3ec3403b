"""Worker processes: with ``workers = N`` one proxy serves its listen address from N processes.

Why: a process answers from one event loop, and that loop saturates long before the cores do
(bench/guards.py: a cache hit is ~75 us of loop time; the searches release the GIL).

How:
* Every process binds the address with SO_REUSEPORT; the kernel spreads new connections over
  them (a keep-alive connection stays with the process that accepted it).
* Worker 0, the process that was started, is the proxy as configured: in role standalone it
  exports, builds, publishes and serves replicas. Workers 1..N-1 follow the snapshot store
  as role replica does, so one export and one build serve every worker.
* Forwarded writes are counted in a shared ledger (proxy/ops/ledger.py): read-your-writes and the
  cache's invalidation hold whichever worker a request reaches, and worker 0 rebuilds after a
  write that another worker forwarded (relay_writes). A worker that cannot export asks for
  on-demand replicas through the store (sync/scheduler.py ask_for).
* /metrics on any worker answers for all of them, each series labelled worker="i": every
  worker leaves its figures in a shared run directory once a second (publish_metrics).
* Worker 0 supervises: a worker that exits unexpectedly is started again; on SIGTERM it
  passes the signal on and every worker drains on its own. A worker whose worker 0 died
  outright drains and exits too (within ORPHAN_CHECK_S), so none is left holding the port.
  (Not PR_SET_PDEATHSIG: it fires when the spawning *thread* exits, which a dying worker 0
  does before the rest of it, so a worker could not tell that from a shutdown request.)
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from index.holder import ReplicaSet
from proxy.config import Config
from proxy.ops.ledger import LISTENING, READY, STARTING, Ledger
from proxy.ops.metrics import Metrics
from sync.follower import StoreFollower
from sync.scheduler import RebuildScheduler

log = logging.getLogger(__name__)

# `python -m proxy _worker INDEX LEDGER_FD RUN_DIR`, the settings as JSON on stdin: the
# entry point of workers 1..N-1 (proxy/cli.py worker_main), not a command for people.
WORKER_COMMAND = "_worker"

RESTART_DELAY_S = 1.0  # doubled for a worker that keeps dying young, up to RESTART_MAX_S
RESTART_MAX_S = 30.0
YOUNG_S = 10.0
ORPHAN_CHECK_S = 0.5


METRICS_INTERVAL_S = 1.0


@dataclass(frozen=True, slots=True)
class Worker:
    """This process as worker ``index`` of ``count``: what it shares with the others."""

    index: int
    count: int
    ledger: Ledger
    run_dir: Path  # each worker's metrics, for the others' /metrics


def first_worker(config: Config) -> Worker:
    """Worker 0's view, with a new ledger and run directory, in memory (/dev/shm) where
    there is one. The caller closes the ledger and removes the directory."""
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(config.data_dir)
    run_dir = Path(tempfile.mkdtemp(prefix="replica-proxy-", dir=base))
    return Worker(0, config.workers, Ledger.create(run_dir), run_dir)


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


def restart_delay(previous_s: float, lived_s: float) -> float:
    """How long to wait before starting again a worker that exited after ``lived_s``: at
    once if it ran a while, else twice the previous wait (at least RESTART_DELAY_S, at most
    RESTART_MAX_S), so that a worker that cannot start does not spin."""
    if lived_s >= YOUNG_S:
        return 0.0
    return min(max(2 * previous_s, RESTART_DELAY_S), RESTART_MAX_S)


class Workers:
    """Worker 0's view of workers 1..N-1: start, restart, stop."""

    def __init__(self, config: Config, primary_url: str, listen: str, first: Worker) -> None:
        self.count = config.workers
        self._config = worker_config(config, primary_url, listen)
        self._first = first
        self._procs: dict[int, subprocess.Popen[bytes]] = {}
        self._started: dict[int, float] = {}
        self._delay: dict[int, float] = {}
        self._stopping = False

    def start(self) -> None:
        for index in range(1, self.count):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        settings = {f.name: getattr(self._config, f.name) for f in dataclasses.fields(Config)}
        # The settings go through stdin: the command line would show admin_token to `ps`.
        fd, run_dir = self._first.ledger.fd, self._first.run_dir
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", WORKER_COMMAND, str(index), str(fd), str(run_dir)],
            stdin=subprocess.PIPE,
            pass_fds=(fd,),
            start_new_session=True,  # Ctrl-C reaches worker 0 only; it passes SIGTERM on
        )
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(settings).encode())
        proc.stdin.close()
        self._procs[index] = proc
        self._started[index] = time.monotonic()
        log.info("worker %d started (pid %d)", index, proc.pid)

    async def supervise(self) -> None:
        """Start again any worker that exits while the proxy is not shutting down; one that
        keeps dying within YOUNG_S of its start waits twice as long each time."""
        due: dict[int, float] = {}
        while True:
            await asyncio.sleep(RESTART_DELAY_S)
            now = time.monotonic()
            for index, proc in list(self._procs.items()):
                if proc.poll() is None or self._stopping:
                    continue
                if index not in due:  # its exit is news
                    lived = now - self._started[index]
                    delay = self._delay[index] = restart_delay(self._delay.get(index, 0.0), lived)
                    due[index] = now + delay
                    log.error(
                        "worker %d exited (%s); starting it again in %.0fs",
                        index,
                        proc.returncode,
                        delay,
                    )
                if now >= due[index]:
                    del due[index]
                    self._spawn(index)

    def signal(self) -> None:
        """Pass a shutdown signal on (a second one makes them cancel in-flight requests)."""
        self._stopping = True
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    def reload(self) -> None:
        """Pass SIGHUP on: each worker reloads its own tokens file and TLS certificate."""
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGHUP)

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
    ledger: Ledger,
    scheduler: RebuildScheduler | StoreFollower,
    replicas: ReplicaSet,
    interval_s: float,
) -> None:
    """Worker 0: a write that another worker forwarded asks for the same rebuild as one of
    its own (a collection's counter in the ledger moved): worker 0 builds it, or (role
    replica) asks the builder for it."""
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


async def publish_metrics(metrics: Metrics, worker: Worker, interval_s: float) -> None:
    """Leave this worker's metrics where the others' /metrics reads them."""
    path = worker.run_dir / f"metrics-{worker.index}.prom"
    tmp = path.with_suffix(".tmp")
    while True:
        tmp.write_bytes(metrics.render())
        os.replace(tmp, path)
        await asyncio.sleep(interval_s)


def render_all(metrics: Metrics, worker: Worker) -> bytes:
    """Every worker's metrics in one exposition, each series labelled with its worker: this
    one's as of now, the others' as of their last publish_metrics (at most a second old)."""
    families: dict[str, Metric] = {}
    for index in range(worker.count):
        if index == worker.index:
            text = metrics.render().decode()
        else:
            try:
                text = (worker.run_dir / f"metrics-{index}.prom").read_text()
            except FileNotFoundError:  # starting
                continue
        for family in text_string_to_metric_families(text):
            label = {"worker": str(index)}
            samples = [s._replace(labels={**s.labels, **label}) for s in family.samples]
            merged = families.setdefault(family.name, family)
            merged.samples = samples if merged is family else merged.samples + samples
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(families.values())))
    return generate_latest(registry)


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


async def until_orphaned(parent: int) -> None:
    """Return once this process' parent (worker 0) is gone. Polled: nothing signals it (see
    the module docstring), and a getppid() twice a second costs nothing."""
    while True:
        if os.getppid() != parent:
            return
        await asyncio.sleep(ORPHAN_CHECK_S)
