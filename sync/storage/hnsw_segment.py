"""The primary's HNSW vector segment: a consistent copy of its files, validated, and turned into
a file stock hnswlib 0.8.0 loads.

A segment directory (named by the vector segment id) holds ``header.bin`` (an int32 format
version, then hnswlib's saved header), ``data_level0.bin`` (hnswlib's level-0 block per element:
link count and flags, links, vector, u64 label), ``length.bin`` (one float32 per element),
``link_lists.bin`` (per element a u32 byte size, then its upper-level links) and, from the first
flush on, ``index_metadata.pickle`` (the label <-> id maps). The primary rewrites these files in
place every ``sync_threshold`` operations (chroma-wire.md section 11.1), so they are never read
live: :func:`copy_segment` copies them until two looks agree, and everything else reads the copy.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import shutil
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .errors import SegmentCorrupt, SegmentUnstable

HEADER_FILE = "header.bin"
DATA_FILE = "data_level0.bin"
LENGTH_FILE = "length.bin"
LINKS_FILE = "link_lists.bin"
PICKLE_FILE = "index_metadata.pickle"
SEGMENT_FILES = (HEADER_FILE, DATA_FILE, LENGTH_FILE, LINKS_FILE, PICKLE_FILE)
HNSWLIB_FILE = "hnswlib.bin"  # written into the copy: what hnswlib.Index.load_index reads

PERSISTENCE_VERSION = 1  # chroma's hnswlib fork, PERSISTENCE_VERSION
# version i32, offsetLevel0 u64, max_elements u64, cur_element_count u64,
# size_data_per_element u64, label_offset u64, offsetData u64, maxlevel i32,
# enterpoint_node i32, maxM u64, maxM0 u64, M u64, mult f64, ef_construction u64
_HEADER = struct.Struct("<iQQQQQQiiQQQdQ")
HEADER_SIZE = _HEADER.size  # 100
DELETED_BIT = 1 << 16  # hnswlib's DELETE_MARK (0x01) in byte 2 of the level-0 link count
_DEGREE_MASK = 0xFFFF  # the link count proper: the low 16 bits


@dataclass(frozen=True, slots=True)
class HnswHeader:
    """``header.bin``: Chroma's format version, then hnswlib's saved header fields."""

    version: int
    offset_level0: int
    max_elements: int
    cur_element_count: int
    size_data_per_element: int
    label_offset: int
    offset_data: int
    maxlevel: int
    enterpoint_node: int  # -1 while the index is empty
    max_m: int
    max_m0: int
    m: int
    mult: float
    ef_construction: int

    @property
    def dimensionality(self) -> int:
        """Vector length in float32s: the bytes between the links and the label."""
        return (self.label_offset - self.offset_data) // 4


def parse_header(raw: bytes) -> HnswHeader:
    """Parse ``header.bin`` (exactly 100 bytes) without judging its values (see validate)."""
    if len(raw) != HEADER_SIZE:
        raise SegmentCorrupt(f"{HEADER_FILE} has {len(raw)} bytes, expected {HEADER_SIZE}")
    return HnswHeader(*_HEADER.unpack(raw))


# -- the pickled label map ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LabelMap:
    """``index_metadata.pickle``: hnswlib labels of the live ids, and the label counter."""

    id_to_label: dict[str, int]
    label_to_id: dict[int, str]
    total_elements_added: int  # labels are 1..total_elements_added, never reused
    dimensionality: int | None  # None in every 1.5.9 file seen
    max_seq_id: int | None  # deprecated there (None); the position is in SQLite's max_seq_id


EMPTY_LABELS = LabelMap({}, {}, 0, None, None)


class _NoClassesUnpickler(pickle._Unpickler):
    """Reads plain containers and scalars only: any class or function reference is refused,
    so a crafted file cannot run code (the real file holds dicts, strings and ints).

    The pure-Python unpickler, not the C one: the C one builds a 100k-row label map in one
    call that holds the GIL for ~175 ms, and a take runs beside the serving event loop. This
    one is slower (it runs in the take's thread) but lets the loop in between."""

    def find_class(self, module: str, name: str) -> Any:
        raise SegmentCorrupt(f"{PICKLE_FILE} refers to {module}.{name}; refused")


def read_label_map(raw: bytes) -> LabelMap:
    """Unpickle ``index_metadata.pickle`` without importing anything, then check its types and
    that the two maps are inverses of each other."""
    try:
        data = _NoClassesUnpickler(io.BytesIO(raw)).load()
    except SegmentCorrupt:
        raise
    except Exception as exc:  # any malformed pickle: truncated, bad opcode, ...
        raise SegmentCorrupt(f"{PICKLE_FILE} does not unpickle: {exc!r}") from exc
    if not isinstance(data, dict):
        raise SegmentCorrupt(f"{PICKLE_FILE} holds a {type(data).__name__}, not a dict")
    labels = LabelMap(
        id_to_label=_typed_map(data, "id_to_label", _is_str, _is_label),
        label_to_id=_typed_map(data, "label_to_id", _is_label, _is_str),
        total_elements_added=_typed_int(data, "total_elements_added"),
        dimensionality=_optional_int(data, "dimensionality"),
        max_seq_id=_optional_int(data, "max_seq_id"),
    )
    _check_inverse(labels)
    return labels


def _is_label(value: object) -> bool:
    """A non-negative int (bool is an int subclass: refused)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_str(value: object) -> bool:
    return isinstance(value, str)


def _typed_int(data: dict[Any, Any], key: str) -> int:
    value = data.get(key)
    if not isinstance(value, int) or not _is_label(value):
        raise SegmentCorrupt(f"{PICKLE_FILE}: {key} is {value!r}, not a non-negative int")
    return value


def _optional_int(data: dict[Any, Any], key: str) -> int | None:
    return None if data.get(key) is None else _typed_int(data, key)


def _typed_map(
    data: dict[Any, Any],
    key: str,
    key_ok: Callable[[object], bool],
    value_ok: Callable[[object], bool],
) -> dict[Any, Any]:
    value = data.get(key)
    if not isinstance(value, dict):
        raise SegmentCorrupt(f"{PICKLE_FILE}: {key} is not a dict")
    for k, v in value.items():
        if not (key_ok(k) and value_ok(v)):
            raise SegmentCorrupt(f"{PICKLE_FILE}: {key} maps {k!r} to {v!r}")
    return value


def _check_inverse(labels: LabelMap) -> None:
    if len(labels.id_to_label) != len(labels.label_to_id) or any(
        labels.label_to_id.get(label) != eid for eid, label in labels.id_to_label.items()
    ):
        raise SegmentCorrupt(f"{PICKLE_FILE}: id_to_label and label_to_id disagree")


# -- copying -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SegmentCopy:
    """A stable, validated copy of a vector segment."""

    directory: Path  # the copy
    header: HnswHeader | None  # None: never flushed (no files, or an empty index, no pickle)
    labels: LabelMap
    seq: int  # the vector segment's max_seq_id when copied (0: none yet)
    hnswlib_path: Path | None  # loads with hnswlib.Index.load_index; None when header is None


_Stat = tuple[int, int, int]  # size, mtime_ns, inode


def _stat_files(directory: Path) -> dict[str, _Stat]:
    """(size, mtime_ns, inode) of each segment file present."""
    stats: dict[str, _Stat] = {}
    for name in SEGMENT_FILES:
        try:
            st = os.stat(directory / name)
        except FileNotFoundError:
            continue
        stats[name] = (st.st_size, st.st_mtime_ns, st.st_ino)
    return stats


def _copy_files(source: Path, dest: Path, names: list[str]) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for name in SEGMENT_FILES:  # drop what an earlier attempt copied and is gone now
        if name not in names:
            (dest / name).unlink(missing_ok=True)
    for name in names:
        shutil.copyfile(source / name, dest / name)


def copy_segment(
    segment_dir: Path,
    dest: Path,
    seq_of: Callable[[], int | None],
    attempts: int = 5,
    quiet_s: float = 0.05,
) -> SegmentCopy:
    """Copy the segment's files into ``dest`` until ``seq_of()`` (the vector segment's
    max_seq_id) and every file's size, mtime and inode are the same before and after the copy,
    and no file was written in the last ``quiet_s``; then validate the copy and write its
    hnswlib file there.

    The quiet period is there because mtimes move in kernel ticks (a few ms): two writes of one
    flush within a tick look alike. The primary records max_seq_id only after its files, so a
    copy taken in between covers rows past ``seq``; replaying those again is harmless (an add
    of a known id is ignored, a delete of an unknown one too, an update rewrites the same
    vector).

    Raises SegmentUnstable after ``attempts`` changed copies, SegmentCorrupt if the stable copy
    fails validation. A missing ``segment_dir`` (no write yet) is a never-flushed segment."""
    why = "no attempt"
    for attempt in range(attempts):
        seq, stats = seq_of(), _stat_files(segment_dir)
        # A file that goes away mid-copy makes the second look below differ.
        with contextlib.suppress(FileNotFoundError):
            _copy_files(segment_dir, dest, sorted(stats))
        why = _changed(seq, stats, seq_of(), _stat_files(segment_dir), quiet_s)
        if not why:
            return _finish_copy(dest, seq or 0)
        time.sleep(0.02 * (attempt + 1))  # a flush is in progress: let it finish
    raise SegmentUnstable(f"{segment_dir} changed during each of {attempts} copies ({why})")


def _changed(
    seq: int | None,
    stats: dict[str, _Stat],
    seq_after: int | None,
    stats_after: dict[str, _Stat],
    quiet_s: float,
) -> str:
    """Why a copy cannot be trusted, or "" when it can."""
    if seq != seq_after:
        return f"max_seq_id {seq} -> {seq_after}"
    if stats != stats_after:
        names = sorted(
            n for n in stats.keys() | stats_after.keys() if stats.get(n) != stats_after.get(n)
        )
        return "changed: " + ", ".join(names)
    newest = max((mtime for _, mtime, _ in stats.values()), default=0)
    age_s = (time.time_ns() - newest) / 1e9
    return f"written {age_s * 1000:.0f} ms ago" if age_s < quiet_s else ""


def _finish_copy(dest: Path, seq: int) -> SegmentCopy:
    header, labels = _read_copy(dest)
    if header is None:
        (dest / HNSWLIB_FILE).unlink(missing_ok=True)  # from an earlier copy into dest
        return SegmentCopy(dest, None, labels, seq, None)
    links_bytes = _check_files(dest, header, labels)
    return SegmentCopy(dest, header, labels, seq, _write_hnswlib_file(dest, header, links_bytes))


def _read_copy(dest: Path) -> tuple[HnswHeader | None, LabelMap]:
    """Header and labels of a copy. Before the first flush there is no pickle and the header
    (if any) describes an empty index: that is "never flushed", header None."""
    header_path, pickle_path = dest / HEADER_FILE, dest / PICKLE_FILE
    header = parse_header(header_path.read_bytes()) if header_path.exists() else None
    if not pickle_path.exists():
        if header is not None and header.cur_element_count != 0:
            raise SegmentCorrupt(f"{header.cur_element_count} elements but no {PICKLE_FILE}")
        return None, EMPTY_LABELS
    if header is None:
        raise SegmentCorrupt(f"{PICKLE_FILE} without {HEADER_FILE}")
    return header, read_label_map(pickle_path.read_bytes())


def _write_hnswlib_file(dest: Path, header: HnswHeader, links_bytes: int) -> Path:
    """hnswlib's own saveIndex layout: header fields, level-0 data of the live element count
    only (the primary's file may be longer: preallocated capacity), then exactly the link
    lists (load_index refuses any byte more or less)."""
    path = dest / HNSWLIB_FILE
    level0 = header.cur_element_count * header.size_data_per_element
    with open(path, "wb") as out:
        out.write((dest / HEADER_FILE).read_bytes()[4:])
        _copy_prefix(dest / DATA_FILE, out, level0)
        _copy_prefix(dest / LINKS_FILE, out, links_bytes)
    return path


def _copy_prefix(source: Path, out: io.BufferedWriter, length: int) -> None:
    with open(source, "rb") as src:
        remaining = length
        while remaining:
            block = src.read(min(remaining, 1 << 22))
            if not block:
                raise SegmentCorrupt(f"{source.name} ends early")
            out.write(block)
            remaining -= len(block)


# -- validation --------------------------------------------------------------------------------


def validate(copy: SegmentCopy) -> None:
    """Raise SegmentCorrupt unless the copy passes the checks of Chroma's own validator
    (rust/segment/src/local_hnsw/persistence.rs): header consistency, level-0 degrees and
    link ids, labels, the label map, and the upper-level link lists."""
    if copy.header is None:
        if copy.labels.id_to_label:
            raise SegmentCorrupt("labels without a header")
        return
    _check_files(copy.directory, copy.header, copy.labels)


def _check_files(directory: Path, header: HnswHeader, labels: LabelMap) -> int:
    """Every check of :func:`validate`; returns the bytes of link_lists.bin the elements use
    (the hnswlib file must end exactly there)."""
    _check_header(header, labels)
    _check_level0(_level0(directory, header), header, labels)
    return _check_link_lists(directory / LINKS_FILE, header)


def _check_header(h: HnswHeader, labels: LabelMap) -> None:
    vector_bytes = h.label_offset - h.offset_data
    problems = [
        (h.version != PERSISTENCE_VERSION, f"format version {h.version}"),
        (h.offset_level0 != 0, f"offsetLevel0 {h.offset_level0}"),
        (h.max_elements < h.cur_element_count, "count above capacity"),
        (h.max_m == 0 or h.m == 0 or h.max_m0 < h.max_m, "M / maxM / maxM0"),
        (h.max_m0 > _DEGREE_MASK, f"maxM0 {h.max_m0} does not fit the 16-bit link count"),
        (h.offset_data != 4 * h.max_m0 + 4, f"offsetData {h.offset_data} != 4*maxM0+4"),
        (vector_bytes <= 0 or vector_bytes % 4 != 0, f"vector bytes {vector_bytes}"),
        (h.label_offset + 8 != h.size_data_per_element, "label_offset+8 != element size"),
        (
            h.cur_element_count > 0 and not (0 <= h.enterpoint_node < h.cur_element_count),
            f"entry point {h.enterpoint_node} of {h.cur_element_count}",
        ),
        (h.cur_element_count > 0 and h.maxlevel < 0, f"maxlevel {h.maxlevel}"),
        (
            labels.dimensionality is not None and labels.dimensionality != h.dimensionality,
            f"pickle dimensionality {labels.dimensionality} != {h.dimensionality}",
        ),
    ]
    for failed, what in problems:
        if failed:
            raise SegmentCorrupt(f"{HEADER_FILE}: {what}")


def _level0(directory: Path, h: HnswHeader) -> np.ndarray[Any, np.dtype[np.void]]:
    """The first cur_element_count elements of data_level0.bin as structured records (the file
    may be longer: the primary writes its preallocated capacity at creation). Memory-mapped:
    the file is our private copy, and only the fields read are paged in."""
    count, stride = h.cur_element_count, h.size_data_per_element
    for name, needed in ((DATA_FILE, count * stride), (LENGTH_FILE, count * 4)):
        size = (directory / name).stat().st_size
        if size < needed:
            raise SegmentCorrupt(f"{name} has {size} bytes, {count} elements need {needed}")
    element = np.dtype(
        {
            "names": ["flags", "links", "label"],
            "formats": ["<u4", ("<u4", (h.max_m0,)), "<u8"],
            "offsets": [0, 4, h.label_offset],
            "itemsize": stride,
        }
    )
    if count == 0:  # an empty file cannot be mapped
        return np.zeros(0, dtype=element)
    return np.memmap(directory / DATA_FILE, dtype=element, mode="r", shape=(count,))


def _check_level0(
    level0: np.ndarray[Any, np.dtype[np.void]], h: HnswHeader, labels: LabelMap
) -> None:
    count = h.cur_element_count
    flags = level0["flags"]
    degree = flags & _DEGREE_MASK
    if np.any(degree > h.max_m0):
        raise SegmentCorrupt(f"a level-0 degree exceeds maxM0 {h.max_m0}")
    used = np.arange(h.max_m0) < degree[:, None]
    if np.any(level0["links"][used] >= count):
        raise SegmentCorrupt(f"a level-0 link points past element {count - 1}")
    _check_labels(level0["label"], (flags & DELETED_BIT) == 0, labels)


def _check_labels(
    native: npt.NDArray[np.uint64], live: npt.NDArray[np.bool_], labels: LabelMap
) -> None:
    """Labels unique, in 1..total_elements_added; every live one known to the map, and the
    map holds no other (so count = live ids + deleted elements)."""
    if native.size and (native.min() == 0 or native.max() > labels.total_elements_added):
        raise SegmentCorrupt(f"a label is 0 or above {labels.total_elements_added}")
    if np.unique(native).size != native.size:
        raise SegmentCorrupt("duplicate labels in data_level0.bin")
    known = np.fromiter(labels.label_to_id, dtype=np.uint64, count=len(labels.label_to_id))
    live_labels = native[live]
    if not np.isin(live_labels, known).all():
        raise SegmentCorrupt("a live element's label is not in label_to_id")
    if live_labels.size != len(labels.id_to_label):
        raise SegmentCorrupt(
            f"{live_labels.size} live elements but {len(labels.id_to_label)} ids in the map"
        )


def _check_link_lists(path: Path, h: HnswHeader) -> int:
    """Walk link_lists.bin (per element: u32 byte size, then that many bytes of upper-level
    links); check each size and every upper-level block. Returns the bytes walked."""
    if path.stat().st_size % 4:
        raise SegmentCorrupt(f"{LINKS_FILE} size is not a multiple of 4")
    words = np.fromfile(path, dtype="<u4")
    block_words = h.max_m + 1  # u32 count, then maxM links
    starts, end = _link_list_blocks(words, h.cur_element_count, block_words, max(h.maxlevel, 0))
    if starts.size:
        blocks = words[starts[:, None] + np.arange(block_words)]
        degree = blocks[:, 0]
        if np.any(degree > h.max_m):
            raise SegmentCorrupt(f"an upper-level degree exceeds maxM {h.max_m}")
        used = np.arange(h.max_m) < degree[:, None]
        if np.any(blocks[:, 1:][used] >= h.cur_element_count):
            raise SegmentCorrupt("an upper-level link points past the last element")
    return end * 4


def _link_list_blocks(
    words: npt.NDArray[np.uint32], count: int, block_words: int, maxlevel: int
) -> tuple[npt.NDArray[np.int64], int]:
    """Word offsets of every upper-level block, and the word offset after the last element.

    Most elements have no upper level, so their size word is 0; only the next non-zero word
    can start a non-empty list, which lets the walk jump over runs of empty ones."""
    nonzero = np.flatnonzero(words)
    starts: list[npt.NDArray[np.int64]] = []
    pos, element = 0, 0
    while element < count:
        i = int(np.searchsorted(nonzero, pos))
        nxt = int(nonzero[i]) if i < nonzero.size else words.size
        if element + (nxt - pos) >= count:  # the rest are empty lists
            pos += count - element
            break
        element += nxt - pos  # elements pos..nxt-1 had size 0
        size = int(words[nxt])
        if size % (4 * block_words) or size // (4 * block_words) > maxlevel:
            raise SegmentCorrupt(f"{LINKS_FILE}: element {element} has {size} link bytes")
        levels = size // (4 * block_words)
        starts.append(nxt + 1 + block_words * np.arange(levels, dtype=np.int64))
        pos, element = nxt + 1 + size // 4, element + 1
        if pos > words.size:
            break
    if pos > words.size:
        raise SegmentCorrupt(f"{LINKS_FILE} ends early")
    return (np.concatenate(starts) if starts else np.zeros(0, np.int64)), pos


def deleted_labels(copy: SegmentCopy) -> npt.NDArray[np.uint64]:
    """Labels of the elements marked deleted in the copy's data_level0.bin (hnswlib keeps them,
    flagged, until the index is rebuilt). Empty for a never-flushed copy."""
    if copy.header is None:
        return np.zeros(0, dtype=np.uint64)
    level0 = _level0(copy.directory, copy.header)
    deleted = level0["label"][(level0["flags"] & DELETED_BIT) != 0]
    return np.array(deleted, dtype=np.uint64)  # a plain array, not a view of the mapping


def label_lengths(copy: SegmentCopy) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.float32]]:
    """(label, stored length) of every element of the copy. For cosine the graph holds unit
    vectors and the primary returns an embedding as the stored unit vector times this float32
    length (chroma's hnswlib fork, getDataByLabel), so a replica that multiplies the same two
    float32 numbers returns the same bits. Empty for a never-flushed copy."""
    if copy.header is None:
        return np.zeros(0, np.uint64), np.zeros(0, np.float32)
    level0 = _level0(copy.directory, copy.header)
    count = copy.header.cur_element_count
    lengths = np.fromfile(copy.directory / LENGTH_FILE, dtype="<f4", count=count)
    return np.array(level0["label"], dtype=np.uint64), lengths.astype(np.float32)
