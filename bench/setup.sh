#!/usr/bin/env bash
# What the benchmarks need beyond `make test`'s virtualenv: the wrk and h2load load generators
# (Debian packages) and matplotlib for the plots.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v wrk >/dev/null || ! command -v h2load >/dev/null; then
  apt-get update -qq && apt-get install -y -qq wrk nghttp2-client
fi
make venv
.venv/bin/python -m pip install --quiet -e '.[dev,bench]'
