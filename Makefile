# The two commands of the README:
#   make demo   set up .venv, run the main job on the embedded default (real SmolLM2, built-in facts),
#               then say in one line whether it reproduced the committed demo of the precision it ran in
#   make test   set up .venv (if needed) and run the test suite
#   make docs   regenerate docs/configuration.md and the docs' tables of committed results (a test checks them)
VENV        ?= .venv
export GRADUAL_CACHE_DIR    ?= $(CURDIR)/.cache/gradual
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export HF_HUB_OFFLINE       ?= 1
export TOKENIZERS_PARALLELISM ?= false
PYTEST_ARGS ?=
DEMO_OUT    ?= runs/default
# the committed demo results, one per precision `dtype auto` can choose ({dtype}: float32 or bfloat16)
DEMO_COMMITTED ?= benchmarks/results/demo-cpu-{dtype}

.PHONY: setup demo test docs clean
setup:
	@bash launchers/setup_env.sh

demo: setup
	$(VENV)/bin/gradual run --out $(DEMO_OUT)
	@$(VENV)/bin/gradual report $(DEMO_OUT) --compare '$(DEMO_COMMITTED)'

test: setup
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

docs:
	$(VENV)/bin/python -m toolkit.docgen

clean:
	rm -rf $(VENV) .cache
