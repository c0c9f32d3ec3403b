"""The `replica-proxy` command: `serve` runs the proxy, `config-docs` prints the config table.

Exit codes: 0 clean shutdown, 1 start-up failure (e.g. the embedded primary did not start),
2 bad command line or configuration (one line on stderr naming the key).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from . import __version__
from .config import FIELDS, Config, ConfigError, docs_table, env_name, field_type, flag_name, load
from .embedded import EmbeddedPrimaryError

PROG = "replica-proxy"


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


def parser() -> _Parser:
    top = _Parser(prog=PROG, description="Read-replica caching proxy for Chroma.")
    top.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = top.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _serve_parser(sub)
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


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _run(config: Config) -> None:
    from .server import serve  # imported late: `config-docs` and `--help` stay fast

    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        asyncio.run(serve(config))
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(config))


def main(argv: Sequence[str] | None = None) -> int:
    args = vars(parser().parse_args(argv))
    command = args.pop("command")
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
    configure_logging(config.log_level)
    try:
        _run(config)
    except EmbeddedPrimaryError as exc:
        logging.getLogger(PROG).error("%s", exc)
        return 1
    except OSError as exc:  # e.g. the listen address is in use, data_dir not writable
        logging.getLogger(PROG).error("cannot start: %s", exc)
        return 1
    return 0
