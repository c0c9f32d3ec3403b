# The two commands a new user needs (see README):
#   make run   - the proxy in front of an embedded Chroma primary with sample data
#   make test  - lint, type-check and the whole test suite
# Both create (or reuse) the virtualenv at .venv.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Reinstall only when the dependency list changes.
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml vendor/hnswlib/* | cksum | cut -d' ' -f1)
ARGS ?=

.PHONY: run test lint docs venv js haproxy clean

venv: $(STAMP)

$(STAMP): pyproject.toml vendor/hnswlib/release-gil.patch vendor/hnswlib/install.sh
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# hnswlib with load_index/save_index releasing the GIL (why: vendor/hnswlib/install.sh)
	bash vendor/hnswlib/install.sh $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@rm -f $(VENV)/.installed-*
	@touch $@

run: $(STAMP)
	$(BIN)/replica-proxy serve --sample-data $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check proxy index sync tests bench
	$(BIN)/ruff format --check proxy index sync tests bench
	$(BIN)/mypy

# The JS client tests need Node.js; without npm they are skipped (and say so).
JS_STAMP := tests/js/node_modules/.installed-$(shell cat tests/js/package-lock.json | cksum | cut -d' ' -f1)

js:
	@if command -v npm >/dev/null 2>&1; then $(MAKE) -s --no-print-directory $(JS_STAMP); \
	else echo "npm not found: the JS client tests will be skipped"; fi

$(JS_STAMP): tests/js/package-lock.json
	npm ci --prefix tests/js --no-audit --no-fund --silent
	@touch $@

# The rolling-restart test puts the proxies behind a real haproxy (Debian's package; /usr/sbin
# is not on every PATH, the test looks there too); without it (no apt-get, or not root) that
# test is skipped and says so.
haproxy:
	@if command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ]; then :; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
		echo "haproxy not found and no apt-get: the rolling-restart test will be skipped"; \
	elif [ "$$(id -u)" != 0 ]; then \
		echo "haproxy not found and not root (apt-get install haproxy): the rolling-restart test will be skipped"; \
	else \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -qq --no-install-recommends haproxy >/dev/null 2>&1 \
		|| { apt-get update -qq >/dev/null \
			&& apt-get install -y -qq --no-install-recommends haproxy >/dev/null; } \
		|| echo "installing haproxy failed: the rolling-restart test will be skipped"; \
	fi

test: lint js haproxy
	$(BIN)/python -m pytest $(ARGS)

# Regenerate the README's configuration table from the code.
docs: $(STAMP)
	$(BIN)/replica-proxy config-docs --update README.md

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache tests/js/node_modules
