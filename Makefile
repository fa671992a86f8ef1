# The two commands of the README: `make demo` and `make test`. Both create .venv when it is
# missing and reinstall the project when pyproject.toml changed since the last install.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m slider_cn.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

# CPU benchmarks against plain diffusers + peft / controlnet-aux loops, and the slider-quality
# table of the step semantics on the shapes model (several minutes);
# bench/gpu.sh is the GPU one.
bench: $(STAMP)
	$(BIN)/python bench/train_step.py
	$(BIN)/python bench/text_step.py
	$(BIN)/python bench/memory.py
	$(BIN)/python bench/cache.py
	$(BIN)/python bench/preprocess.py
	$(BIN)/python bench/quality.py

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache demo_output
