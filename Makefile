# make train — the embedded default run (experiment=tiny_style: tiny model, bundled style set, CPU, ~1 min)
# make test  — the test suite
# make bench — our training vs a plain diffusers-style reference loop (scripts/bench.py train; tiny model)
# Each creates .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# pytest-xdist workers for make test (tests/conftest.py splits the cores between them)
TEST_WORKERS ?= 2

.PHONY: train test bench lint clean

# pip byte-compiles every installed file one at a time (about 90 s of a 2.5-minute install on 2 cores);
# compileall does the same on all cores. A few third-party files are written for newer Pythons and do
# not compile, under pip as here: they are skipped (|| true), and nothing imports them.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --no-compile -e ".[dev]"
	$(BIN)/python -m compileall -q -j 0 "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
		> /dev/null || true
	touch $(STAMP)

train: $(STAMP)
	$(BIN)/finetune-train experiment=tiny_style $(ARGS)

test: $(STAMP) browser
	$(BIN)/lint-imports --no-cache
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# Debian's Chromium and its driver, for the dashboard test (tests/training/test_dashboard.py). Nothing to do
# when they are installed; installed with apt-get when missing and we are root (CI); otherwise a note,
# and that test skips.
.PHONY: browser
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing chromium and chromium-driver for the dashboard test"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	else \
		echo "note: chromium/chromedriver are missing and this is not root, so tests/training/test_dashboard.py" \
			"will skip; to run it: sudo apt-get install chromium chromium-driver"; \
	fi

# Tiny model on the bundled style set, batch 8, LoRA rank 4: our defaults, then data.cache=none, =memory
# and model.compile=true (a cold compile, unless TORCHINDUCTOR_CACHE_DIR holds one), against the
# reference loop. More via ARGS (the last value of an option wins), e.g.
# make bench ARGS="--model sd15 --resolution 512 --batch-size 8 --precision bf16-mixed --device cuda"
bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python scripts/bench.py train --batch-size 8 --rank 4 --steps 60 --warmup 20 \
		--cache --also model.compile=true $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports --no-cache

clean:
	rm -rf outputs .cache
