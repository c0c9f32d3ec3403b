"""Local reads computed on a real replica, built and published the way the builder does."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import orjson

from proxy.replica import local
from sync.build import build_and_publish
from tests.index.test_snapshot import make_export

ROOT = Path(__file__).resolve().parents[2]
# Issue 12: 50 documents that make a backtracking engine try every split of the a's.
HOSTILE = ["a" * 26 + "!"] * 50
CATASTROPHIC = "(a+)+b"


def hostile_answers(store: Path) -> list[object]:
    """The replica's answers to a get and a query whose regex is catastrophic for
    backtracking, on the documents of issue 12."""
    export = make_export(n=50, dim=8, seed=12)
    export.records.documents[:] = HOSTILE
    replica = build_and_publish(export, store, "http://primary", 0, 1)
    bodies: list[tuple[str, dict[str, object]]] = [
        ("get", {"where_document": {"$regex": CATASTROPHIC}, "include": []}),
        ("get", {"where_document": {"$not_regex": CATASTROPHIC}, "include": []}),
        ("query", {"query_embeddings": [replica.vectors[0].tolist()], "n_results": 3,
                   "where": {"#document": {"$regex": CATASTROPHIC}}, "include": []}),
    ]  # fmt: skip
    answers = []
    for op, body in bodies:
        prepared = local.prepare(op, orjson.dumps(body), {}, None, None)
        answers.append(orjson.loads(local.answer(replica, prepared, 0))["ids"])
    return answers


def test_a_catastrophic_regex_is_answered_in_linear_time(tmp_path: Path) -> None:
    """Python's `re` took over 150 s on these (holding both search threads); RE2, like the
    primary's Rust `regex`, is linear. Not timed, since the machine is shared: the work runs
    in a child process killed after a generous 30 s. (A thread with a join timeout would not
    do: `re` holds the GIL for the whole match, so the join only returns once it ends.)"""
    code = f"import json, sys; from {__name__} import hostile_answers as h; "
    code += "print(json.dumps(h(__import__('pathlib').Path(sys.argv[1]))))"
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        timeout=30,
        check=True,
    )
    regex_ids, not_regex_ids, query_ids = json.loads(done.stdout)
    assert regex_ids == []
    assert not_regex_ids == [f"id{i}" for i in range(50)]
    assert query_ids == [[]]
