# Fresh machine: `make demo` and `make test` create .venv themselves.
VENV ?= .venv
PY := $(VENV)/bin/python
ARCH := $(shell uname -m)
# the torch build this project is tested with (x86_64 wheels lie on the development machines' disk)
ifeq ($(ARCH),aarch64)
TORCH_SPEC ?= torch==2.9.1 torchvision==0.24.1
else
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
endif

.PHONY: setup setup-browser demo test test-slow test-ddp lint bench clean mutation

setup: $(VENV)/.installed setup-browser

# headless Chromium + chromedriver for the browser test of 'mics serve' (tests/serve); skipped, not
# failed, where apt is unavailable or not root (the test then skips with its reason)
setup-browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		(apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null) \
		|| echo "setup-browser: apt-get could not install chromium; the browser test will be skipped"; \
	else echo "setup-browser: no chromium/chromedriver (needs root + apt); the browser test will be skipped"; fi

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

demo: setup
	rm -rf runs/demo
	$(VENV)/bin/mics demo --out runs/demo

test: setup
	$(PY) -m pytest

test-slow: setup
	$(PY) -m pytest -m slow

test-ddp: setup
	$(PY) -m pytest -m ddp

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/mypy

# mutation testing of the stages (mutmut; hours on 2 cores, not part of CI): kill rate per module, survivors
mutation: setup
	$(PY) -m pip install --quiet -e '.[mutation]'
	$(PY) scripts/mutation.py $(GROUPS)

bench: setup
	$(PY) benchmarks/throughput.py --preset cpu

clean:
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache
