# Two entry points for a fresh machine (Debian, Python 3.11, pip, root):
#   make demo   builds .venv, installs everything, builds the demo corpus and pretrains on it
#   make test   builds .venv, installs everything, runs the test suite
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.sslkit-installed
APT_PKGS := invesalius-examples mricron-data chromium libaio-dev
# torch / torchvision are pinned here (pyproject.toml keeps ranges) so pip takes the builds on local disk
TORCH   := torch==2.14.1 torchvision==0.29.1
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/sslkit/torch_extensions
export PYTHONUNBUFFERED := 1
export PYTHONUTF8 := 1

.PHONY: demo test setup system-packages clean

setup: $(STAMP)

system-packages:
	@if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then \
	    echo "apt-get install$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  fi; \
	else echo "not root or no apt-get: install $(APT_PKGS) yourself"; fi

$(STAMP): pyproject.toml Makefile
	$(MAKE) system-packages
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade setuptools wheel
	$(BIN)/pip install -q $(TORCH)
	# DeepSpeed ships as an sdist that imports torch to build: build it against the torch above
	$(BIN)/pip install -q --no-build-isolation "deepspeed>=0.15,<0.20"
	$(BIN)/pip install -q -e ".[demo,test]" $(TORCH)
	touch $(STAMP)

demo: setup
	$(BIN)/sslkit data demo --out demo_data
	$(BIN)/sslkit pretrain --cfg pretrain_configs/demo_ct_byol.yaml --run-dir runs/demo_ct_byol

test: setup
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) runs demo_data .cache
