"""The `replica-proxy` command: `serve` runs the proxy, `config-docs` prints the config table,
`backup`, `verify` and `restore` handle backups (sync/backup.py).

Exit codes: 0 clean shutdown, 1 start-up failure (e.g. the embedded primary did not start),
2 bad command line or configuration (one line on stderr naming the key). The backup commands
exit 1 when the backup, verify or restore failed (one line on stderr saying why).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import logging.handlers
import os
import signal
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, NoReturn

from proxy import __version__
from proxy.config import (
    FIELDS,
    Config,
    ConfigError,
    docs_table,
    env_name,
    field_type,
    flag_name,
    load,
)
from proxy.primary.embedded import EmbeddedPrimaryError
from sync.tailer import StorageUnusable

PROG = "replica-proxy"
BACKUP_COMMANDS = ("backup", "verify", "restore")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, like a config error, rather than argparse's usage dump.
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _serve_parser(sub: argparse._SubParsersAction[_Parser]) -> None:
    serve = sub.add_parser(
        "serve",
        help="run the proxy",
        description="Run the proxy. Every option can also be set as an environment variable "
        "(shown in brackets) or a key in the --config TOML file; flags win over the "
        "environment, which wins over the file.",
    )
    serve.add_argument(
        "--config", metavar="FILE", help="TOML file of config keys [REPLICA_PROXY_CONFIG]"
    )
    for name, f in FIELDS.items():
        help_text = f"{f.metadata['help']} [{env_name(name)}; default: {f.default!r}]"
        help_text = help_text.replace("%", "%%")
        if field_type(name) is bool:
            serve.add_argument(
                flag_name(name),
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
        else:
            serve.add_argument(
                flag_name(name),
                dest=name,
                metavar=f.metadata.get("metavar", name.upper()),
                default=argparse.SUPPRESS,
                help=help_text,
            )


def _backup_parsers(sub: argparse._SubParsersAction[_Parser]) -> None:
    backup = sub.add_parser(
        "backup",
        help="export collections from a primary into snapshots under DIR",
        description="Export collections and publish each as a snapshot under --out, in the "
        "snapshot store's layout (DIR/<collection id>/<generation>/). Default: every "
        "collection of default_tenant/default_database.",
    )
    backup.add_argument("--primary", required=True, metavar="URL", help="the Chroma server")
    backup.add_argument("--out", required=True, metavar="DIR", help="where snapshots go")
    backup.add_argument(
        "--database", action="append", metavar="TENANT/DB", help="a database to back up (repeat)"
    )
    backup.add_argument(
        "--collection", action="append", metavar="NAME", help="only this collection (repeat)"
    )
    verify = sub.add_parser(
        "verify",
        help="check the newest snapshot of every collection in DIR",
        description="Checksums, row counts and recall@10 of HNSW against exact search, with "
        "stored vectors as queries. Exit 1 if any snapshot fails.",
    )
    verify.add_argument("dir", metavar="DIR")
    verify.add_argument(
        "--queries", type=int, default=20, metavar="N", help="sample queries per collection (20)"
    )
    restore = sub.add_parser(
        "restore",
        help="load the snapshots in DIR into a primary, then check it",
        description="Create each collection (same name, metadata, configuration) on the "
        "primary, add its records, and check records and query answers against the snapshot. "
        "Refuses, before writing anything, if a collection exists there and is not empty.",
    )
    restore.add_argument("dir", metavar="DIR")
    restore.add_argument("--primary", required=True, metavar="URL", help="the Chroma server")
    restore.add_argument(
        "--collection", action="append", metavar="NAME", help="only this collection (repeat)"
    )
    restore.add_argument(
        "--queries", type=int, default=20, metavar="N", help="queries checked per collection (20)"
    )


def _run_backup_command(command: str, args: dict[str, Any]) -> int:
    try:
        if args.get("primary") is not None:
            Config(primary_url=args["primary"])  # the same URL check as serve's --primary
    except ConfigError as exc:
        print(f"{PROG} {command}: error: --primary: {exc}", file=sys.stderr)
        return 2
    defaults = Config()
    args.update(
        page_rows=defaults.export_page_rows,
        concurrency=defaults.export_concurrency,
        threads=defaults.build_threads,
    )
    configure_logging("info")
    from sync.backup import run  # imported late: `--help` stays fast

    return run(command, args)


def parser() -> _Parser:
    top = _Parser(prog=PROG, description="Read-replica caching proxy for Chroma.")
    top.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = top.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _serve_parser(sub)
    _backup_parsers(sub)
    docs = sub.add_parser("config-docs", help="print the configuration table (Markdown)")
    docs.add_argument(
        "--update", metavar="FILE", help="replace the table in FILE (the README) instead"
    )
    return top


def update_docs(path: Path) -> None:
    """Swap the generated table in ``path`` (from its header row to the next blank line)."""
    text = path.read_text(encoding="utf-8")
    start = text.index(docs_table().splitlines()[0])
    end = text.index("\n\n", start) + 1
    path.write_text(text[:start] + docs_table() + text[end:], encoding="utf-8")


def configure_logging(level: str, worker: int | None = None, audit_file: str | None = None) -> None:
    """Log lines to stderr; with several worker processes, each line names its worker. The
    audit log (proxy.audit) goes to ``audit_file`` alone when there is one: every worker
    appends its own lines to it, one write each."""
    who = "" if worker is None else f"[w{worker}] "
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s %(levelname)s {who}%(name)s: %(message)s",
        stream=sys.stderr,
    )
    if audit_file is not None:
        handler = logging.handlers.WatchedFileHandler(audit_file, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(message)s"))  # each record is a JSON line
        audit = logging.getLogger("proxy.audit")
        audit.addHandler(handler)
        audit.setLevel(logging.INFO)  # audited whatever log_level says
        audit.propagate = False


def _run(config: Config) -> None:
    from proxy.server import serve  # imported late: `config-docs` and `--help` stay fast

    run_loop(config, serve(config))


def run_loop(config: Config, main: Coroutine[Any, Any, None]) -> None:
    """Run the proxy's main coroutine on uvloop, with the configured GIL switch interval."""
    sys.setswitchinterval(config.gil_switch_interval_ms / 1000)
    # Until the app's handler is in place (proxy/app.py), a SIGHUP sent to reload must not
    # stop the process, as the default action would.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        asyncio.run(main)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)


def worker_main(argv: Sequence[str]) -> int:
    """Workers 1..N-1 (proxy/ops/workers.py): ``INDEX LEDGER_FD RUN_DIR``, settings on stdin."""
    from proxy.ops.ledger import Ledger
    from proxy.ops.workers import Worker
    from proxy.server import serve_worker

    index, inherited, run_dir = int(argv[0]), int(argv[1]), Path(argv[2])
    ledger = Ledger.open(Path(f"/proc/self/fd/{inherited}"))
    os.close(inherited)
    config = Config(**json.loads(sys.stdin.read()))
    configure_logging(config.log_level, index, config.audit_log_file)
    run_loop(config, serve_worker(config, Worker(index, config.workers, ledger, run_dir)))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0].startswith("_"):  # not a command for people: see proxy/ops/workers.py
        from proxy.ops.workers import WORKER_COMMAND

        if argv[0] == WORKER_COMMAND:
            return worker_main(argv[1:])
    args = vars(parser().parse_args(argv))
    command = args.pop("command")
    if command in BACKUP_COMMANDS:
        return _run_backup_command(command, args)
    if command == "config-docs":
        if args["update"]:
            update_docs(Path(args["update"]))
        else:
            sys.stdout.write(docs_table())
        return 0
    config_file = args.pop("config")
    try:
        config = load(args, config_file=config_file)
    except ConfigError as exc:
        print(f"{PROG}: config error: {exc}", file=sys.stderr)
        return 2
    try:
        configure_logging(
            config.log_level, 0 if config.workers > 1 else None, config.audit_log_file
        )
        _run(config)
    except (EmbeddedPrimaryError, StorageUnusable) as exc:
        logging.getLogger(PROG).error("%s", exc)
        return 1
    except OSError as exc:  # e.g. the listen address is in use, data_dir not writable
        logging.getLogger(PROG).error("cannot start: %s", exc)
        return 1
    return 0
