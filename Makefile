# kodkod: `make serve` to run the server, `make test` to run the tests.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# CPU build of torch: installed first so that the project's `torch>=2.4`
# never pulls a multi-GB CUDA build onto a machine that has no torch yet.
TORCH_CPU ?= torch==2.13.0

.PHONY: all install install-dev test serve clean

all: install

# The server needs only the project; the tests add the dev extras (transformers, ...).
# constraints.txt pins every runtime dependency but torch (deploy/lock.py writes it).
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q $(TORCH_CPU)
	$(PIP) install -q -c constraints.txt -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

# editors/test.sh: the VS Code extension's tests (node), and a current Neovim for
# tests/editors; each part is skipped with the reason where its tool is missing.
test: install-dev
	PY=$(PY) bash editors/test.sh
	$(PY) -m pytest -q

# PORT=9000 make serve for another port.
PORT ?= 8080
serve: install
	$(VENV)/bin/kodkod serve --port $(PORT)

clean:
	rm -rf $(VENV) build *.egg-info
