#!/usr/bin/env bash
# Installs what the benchmarks need beyond the virtualenv: the wrk load generator (Debian).
set -euo pipefail
if ! command -v wrk >/dev/null; then
  apt-get update -qq && apt-get install -y -qq wrk
fi
