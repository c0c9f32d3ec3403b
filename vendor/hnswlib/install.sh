#!/usr/bin/env bash
# Install hnswlib 0.8.0 with one patch: load_index, save_index and freeing an index release
# the GIL.
#
# Why: stock hnswlib holds the GIL for the whole of load_index (0.1-0.35 s for a 100k x 384
# index), so loading a new replica generation in a worker thread freezes the proxy's event loop
# for that long (DESIGN.md section 4). None of them touches a Python object, so releasing the
# GIL around them is safe (the destructor too: pybind11 deregisters the instance first).
# The patched build reports version 0.8.0+replicaproxy.gil2, which
# still satisfies the `hnswlib==0.8.0` pin. PyPI has no hnswlib 0.8.0 wheels for Linux, so this
# compiles exactly what a plain install would compile, plus the patch.
#
# usage: vendor/hnswlib/install.sh PYTHON
set -euo pipefail
PYTHON=${1:?usage: install.sh PYTHON}
HERE=$(cd "$(dirname "$0")" && pwd)
VERSION=0.8.0
SHA256=cb6d037eedebb34a7134e7dc78966441dfd04c9cf5ee93911be911ced951c44c

if "$PYTHON" -c 'import importlib.metadata as m, sys; sys.exit(0 if m.version("hnswlib").endswith("+replicaproxy.gil2") else 1)' 2>/dev/null; then
    exit 0  # already installed
fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$PYTHON" -m pip download --quiet --no-deps --no-binary hnswlib --dest "$WORK" "hnswlib==$VERSION"
echo "$SHA256  $WORK/hnswlib-$VERSION.tar.gz" | sha256sum --check --quiet
tar -xzf "$WORK/hnswlib-$VERSION.tar.gz" -C "$WORK"
patch --quiet -d "$WORK/hnswlib-$VERSION" -p1 < "$HERE/release-gil.patch"
"$PYTHON" -m pip install --quiet "$WORK/hnswlib-$VERSION"
