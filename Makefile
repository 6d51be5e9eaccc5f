# The two commands of the README:
#   make demo   set up .venv and run the main job on the embedded default (real SmolLM2, built-in facts)
#   make test   set up .venv (if needed) and run the test suite
VENV        ?= .venv
export GRADUAL_CACHE_DIR    ?= $(CURDIR)/.cache/gradual
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export HF_HUB_OFFLINE       ?= 1
export TOKENIZERS_PARALLELISM ?= false
PYTEST_ARGS ?=

.PHONY: setup demo test clean
setup:
	@bash launchers/setup_env.sh

demo: setup
	$(VENV)/bin/gradual run

test: setup
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .cache
