# Everything runs from a project-local virtualenv that these targets create on demand.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo lint test fuzz bench venv clean js

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# The Node.js worker library's one dependency (msgpack), from the npm registry, for apps
# of "type": "nodejs". Without npm, say so: those apps are refused (LanguageUnavailable).
JS_DEPS := workers/js/node_modules/.package-lock.json
$(JS_DEPS): workers/js/package.json workers/js/package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
		npm ci --prefix workers/js --no-audit --no-fund --loglevel=error; \
	else echo "npm not found: nodejs apps will not run (install Node.js and npm)"; fi

# socket.io-client for Sockend: the browser file it serves at /socket.io/socket.io.js
# and the Node client its tests drive (examples/sockend/node_modules, git-ignored).
SIO_DEPS := examples/sockend/node_modules/.package-lock.json
$(SIO_DEPS): examples/sockend/package.json examples/sockend/package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
		npm ci --prefix examples/sockend --no-audit --no-fund --loglevel=error; \
	else echo "npm not found: Sockend cannot serve /socket.io/socket.io.js (install Node.js and npm)"; fi

js: $(JS_DEPS) $(SIO_DEPS)

# The engine on examples/, and Sockend (socket.io and its own protocol) with the example's
# mesh services on SOCKEND_PORT: http://localhost:5555/ and /seed.html (cote's page).
SOCKEND_PORT ?= 5555
demo: $(STAMP) js
	SOCKEND_PORT=$(SOCKEND_PORT) $(PY) examples/demo.py

# Types first: plain mypy on src/, the strict flags on the pure cores ([tool.mypy]).
lint: $(STAMP)
	$(PY) -m mypy

test: lint js
	$(PY) -m pytest -q -p no:cacheprovider

# The fuzzers at length: hypothesis profile "long" (fuzz/conftest.py), 5,000 examples a
# test where `make test` runs 100.  Tens of minutes on 2 cores, so the per-test timeout
# is lifted; a failure it finds becomes an @example (or a pinned test) beside its property.
fuzz: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider fuzz/ --hypothesis-profile=long --timeout=7200

bench: $(STAMP)
	$(PY) -m bench

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .hypothesis .mypy_cache
