"""The on-disk snapshot format: one directory per (collection, generation).

    <store>/<collection id>/<generation>/
        manifest.json   format version, collection model, space and HNSW parameters, row count,
                        when and from what it was cut, and the size and sha256 of every file
        vectors.npy     float32 [rows, dim], opened memory-mapped
        index.hnsw      the hnswlib index (labels are row numbers)
        records.json    {"ids": [...], "documents": [...], "uris": [...], "metadatas": [...]}

A snapshot is written to a hidden temporary directory, every file fsynced, the manifest written
last, then renamed into place (atomic on POSIX) and the parent fsynced: a reader sees a complete
snapshot or none. Reading verifies the manifest and every file's size and checksum before
anything is used.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from .errors import SnapshotCorrupt, SnapshotFormatError

# 2: records.json became JSON lines (index/replica.py Records); 1 is still readable.
FORMAT_VERSION = 2
READABLE_VERSIONS = frozenset({1, 2})
MANIFEST = "manifest.json"
FILES = ("vectors.npy", "index.hnsw", "records.json")
# A take of the primary's own storage (sync/published.py): its graph as hnswlib saves it, the
# records, each row's label in the graph, (cosine) each label's stored vector length, and the
# labels the log replay wrote (their embeddings are left to the primary).
TAKE_FILES = ("index.hnsw", "records.json", "labels.npy", "lengths.npy", "replayed.npy")


@dataclass(frozen=True, slots=True)
class Manifest:
    format_version: int
    collection: dict[str, Any]  # the collection model exactly as the primary returned it
    space: str
    hnsw: dict[str, int]  # M, ef_construction, ef_search
    count: int
    dimension: int | None
    created_at: float  # unix time the export started: the replica includes writes before it
    source: str  # the primary's URL
    covers_write_seq: int  # this proxy's write counter for the collection at export start
    generation: int
    files: dict[str, dict[str, Any]]  # name -> {"bytes": n, "sha256": hex}
    # The write ledger (proxy/ops/ledger.py) covers_write_seq counts in, when the builder was one
    # of several worker processes; its other workers may then trust covers_write_seq too.
    write_ledger: str | None = None
    # A take (TAKE_FILES): the primary's log seq it includes, and the graph's next label.
    log_position: int | None = None
    next_label: int | None = None

    @property
    def collection_id(self) -> str:
        return str(self.collection["id"])

    @property
    def file_names(self) -> tuple[str, ...]:
        return FILES if self.log_position is None else TAKE_FILES

    def to_json(self) -> bytes:
        fields = {name: getattr(self, name) for name in self.__slots__}
        for optional in ("write_ledger", "log_position", "next_label"):
            if fields[optional] is None:
                del fields[optional]  # so that earlier versions still read the manifest
        return orjson.dumps(fields, option=orjson.OPT_INDENT_2)

    @classmethod
    def from_json(cls, raw: bytes) -> Manifest:
        try:
            data = orjson.loads(raw)
            if data.get("format_version") not in READABLE_VERSIONS:
                raise SnapshotFormatError(
                    f"format version {data.get('format_version')!r}, expected {FORMAT_VERSION}"
                )
            return cls(**data)
        except (orjson.JSONDecodeError, TypeError, AttributeError) as exc:
            raise SnapshotFormatError(f"unreadable manifest: {exc}") from None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def new_generation() -> int:
    """Generations sort by time of cut; nanoseconds keep two cuts in one second apart."""
    return time.time_ns()


def publish(
    store: Path,
    manifest_fields: dict[str, Any],
    writers: Mapping[str, Callable[[Path], None]],
) -> tuple[Path, Manifest]:
    """Write a snapshot atomically. ``writers`` maps each of its files (FILES, or TAKE_FILES
    for a take) to a function that writes it to the given path. Returns the published
    directory and its manifest."""
    generation = manifest_fields["generation"]
    collection_dir = store / str(manifest_fields["collection"]["id"])
    collection_dir.mkdir(parents=True, exist_ok=True)
    tmp = collection_dir / f".tmp-{generation}"
    final = collection_dir / str(generation)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        files = {}
        for name in writers:
            writers[name](tmp / name)
            _fsync(tmp / name)
            files[name] = {"bytes": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)}
        manifest = Manifest(format_version=FORMAT_VERSION, files=files, **manifest_fields)
        (tmp / MANIFEST).write_bytes(manifest.to_json())
        _fsync(tmp / MANIFEST)
        _fsync(tmp)
        os.rename(tmp, final)
        _fsync(collection_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final, manifest


def verify(directory: Path) -> Manifest:
    """Read and check a published snapshot; raise SnapshotError if anything is off."""
    try:
        manifest = Manifest.from_json((directory / MANIFEST).read_bytes())
    except FileNotFoundError:
        raise SnapshotFormatError(f"{directory}: no manifest") from None
    if set(manifest.files) != set(manifest.file_names):
        raise SnapshotFormatError(f"{directory}: manifest lists {sorted(manifest.files)}")
    for name, meta in manifest.files.items():
        path = directory / name
        if not path.exists():
            raise SnapshotCorrupt(f"{path}: missing")
        if path.stat().st_size != meta["bytes"]:
            raise SnapshotCorrupt(
                f"{path}: {path.stat().st_size} bytes, manifest says {meta['bytes']}"
            )
        if sha256_file(path) != meta["sha256"]:
            raise SnapshotCorrupt(f"{path}: sha256 mismatch")
    return manifest


def generations(store: Path, collection_id: str) -> list[Path]:
    """Published snapshot directories of a collection, newest first."""
    directory = store / collection_id
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.name.isdigit()]
    return sorted(found, key=lambda p: int(p.name), reverse=True)


def prune(store: Path, collection_id: str, keep: int) -> None:
    """Delete all but the ``keep`` newest generations, and leftovers of interrupted writes."""
    for old in generations(store, collection_id)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    directory = store / collection_id
    if directory.is_dir():
        for tmp in directory.glob(".tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)
