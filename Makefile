# The two set-up commands (README): `make demo` and `make test`. Each creates .venv on first use.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# pytest-xdist workers of `make test` (each starts its own local Ray; tests/conftest.py orders the modules).
# 0 = one process. On 2 cores two workers were no faster (the suite is CPU-bound) and overloaded the machine
# (load average 20) until start-up and shutdown timeouts failed tests; use more on a larger machine.
TEST_WORKERS ?= 0

.PHONY: demo demo-quick test lint browser clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: the CPU wheel; any looser resolution downloads a CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	# clip-anytorch only ships the CLIP BPE vocabulary we need; its deps (torchvision) are not wanted.
	$(PY) -m pip install --quiet --no-deps clip-anytorch==2.6.0
	touch $(STAMP)

# The web page test drives the system Chromium; install it when missing (needs root, as in CI).
browser:
	@test -x /usr/bin/chromium || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }

demo: $(STAMP)
	$(VENV)/bin/sdray demo

demo-quick: $(STAMP)
	$(VENV)/bin/sdray demo --quick

test: $(STAMP) browser
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

lint: $(STAMP)
	$(VENV)/bin/ruff check sdray pipelines tests benchmarks scripts
	$(VENV)/bin/ruff format --check sdray pipelines tests benchmarks scripts

clean-venv:
	rm -rf $(VENV)
