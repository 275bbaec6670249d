# Two entry points for a fresh machine (Debian, Python 3.11, pip, root):
#   make demo   builds .venv, installs everything, builds the demo corpus, pretrains on it, then fine-tunes from
#               that encoder and from scratch and compares them
#   make test   builds .venv, installs everything, runs the test suite
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.sslkit-installed
APT_PKGS := invesalius-examples mricron-data chromium libaio-dev libtcmalloc-minimal4
# torch / torchvision are pinned here (pyproject.toml keeps ranges) so pip takes the builds on local disk
TORCH   := torch==2.14.1 torchvision==0.29.1
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/sslkit/torch_extensions
export PYTHONUNBUFFERED := 1
export PYTHONUTF8 := 1
# glibc's malloc maps and unmaps a CPU step's large activation buffers on every step: the page faults took a fifth
# of the test suite's CPU time (and 29 % of a prompt-tuning run's wall time); tcmalloc keeps them for the next step.
# Found at run time (the package is installed by `setup`); without it the jobs run as before.
TCMALLOC = LD_PRELOAD="$$(ls /usr/lib/*/libtcmalloc_minimal.so.4 2>/dev/null | head -n 1)" \
           TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD=1099511627776
SSLKIT   = $(TCMALLOC) $(BIN)/sslkit

# Debian packages the demo and the tests use, installed where missing (root and apt-get only; a package removed but
# not purged counts as missing)
INSTALL_SYSTEM_PACKAGES = if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  missing=""; for p in $(APT_PKGS); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" \
	    || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then \
	    echo "apt-get install$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  fi; \
	else echo "not root or no apt-get: install $(APT_PKGS) yourself"; fi

.PHONY: demo test setup system-packages clean study

setup: $(STAMP)

system-packages:
	@$(INSTALL_SYSTEM_PACKAGES)

# The system packages install (apt) while pip works: neither needs the other, and each keeps one core busy.
# DeepSpeed ships as an sdist that imports torch to build: it is built against the torch installed just before it.
# pip byte-compiles what it installs one file at a time (38 s of the installation here); compileall does it on every
# core afterwards and leaves out the packages' own tests/ folders, which nothing imports (23 s). Like pip, it leaves
# a file it cannot compile to fail at import (torch ships one in Python 3.12 syntax, under torch/testing).
PIP_INSTALL = $(BIN)/pip install -q --no-compile
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	( $(INSTALL_SYSTEM_PACKAGES) ) > $(VENV)/system-packages.log 2>&1 & apt=$$!; \
	$(PIP_INSTALL) --upgrade setuptools wheel \
	  && $(PIP_INSTALL) $(TORCH) \
	  && $(PIP_INSTALL) --no-build-isolation "deepspeed>=0.15,<0.20" \
	  && $(PIP_INSTALL) -e ".[demo,trackers,bundle,study,test]" $(TORCH); pip=$$?; \
	[ $$pip = 0 ] && { $(BIN)/python -m compileall -q -j 0 -x '/tests?/' \
	  "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" >/dev/null || true; }; \
	wait $$apt; apt=$$?; cat $(VENV)/system-packages.log; [ $$pip = 0 ] && [ $$apt = 0 ]
	touch $(STAMP)

# The main job: pretrain BYOL on the demo corpus, then fine-tune grey / white matter segmentation from that encoder
# and from scratch (same architecture, budget and seed), evaluate both and compare. Re-running continues / reuses.
DEMO_DOWN := downstream/demo_gm_wm_from_plan.yaml
demo: setup
	$(SSLKIT) data demo --out demo_data
	$(SSLKIT) pretrain --cfg pretrain_configs/demo_ct_byol.yaml --run-dir runs/demo_ct_byol --resume auto
	$(SSLKIT) finetune --cfg $(DEMO_DOWN) --encoder runs/demo_ct_byol --run-dir runs/gm_wm_byol --resume auto
	$(SSLKIT) finetune --cfg $(DEMO_DOWN) --encoder runs/demo_ct_byol --scratch --run-dir runs/gm_wm_scratch \
	    --resume auto
	$(SSLKIT) evaluate runs/gm_wm_byol
	$(SSLKIT) evaluate runs/gm_wm_scratch
	$(SSLKIT) compare runs/gm_wm_scratch runs/gm_wm_byol --out runs/demo_compare.md
	@echo "Held-out grey / white matter Dice and HD95 (mm): from scratch vs from the BYOL encoder, same budget."
	@echo "Watch the pretraining: $(BIN)/sslkit dashboard runs/demo_ct_byol   (http://127.0.0.1:8765)"

# Two test processes (most tests run single-threaded sslkit jobs); each test module stays in one process so its
# shared runs are made once, the longest modules first (tests/conftest.py). `make test JOBS=0` runs in this process only.
JOBS ?= 2
test: setup
	$(TCMALLOC) $(BIN)/python -m pytest -q -n $(JOBS) --dist loadscope --no-loadscope-reorder tests

# The label-efficiency demo (docs/study.md): the brain regions task, a task intensity cannot solve, with 1, 2 and 4
# labelled Colin27 slabs x 3 seeds; scratch vs the BYOL demo encoder (make demo's, reused when it exists), one recipe
# (downstream/demo_study.yaml: encoder at lr / 10). Each cell's task-probe Dice, NSD and the rank agreement are in
# the report.
STUDY_OUT ?= runs/study_demo
study: setup
	$(SSLKIT) data demo --out demo_data
	test -f runs/demo_ct_byol/encoder.safetensors || $(SSLKIT) pretrain --cfg pretrain_configs/demo_ct_byol.yaml \
	    --run-dir runs/demo_ct_byol --resume auto --no-progress
	$(SSLKIT) study --cfg downstream/demo_study.yaml --scratch --encoder byol=runs/demo_ct_byol \
	    --budgets 1,2,4 --seeds 0,1,2 --jobs 2 --no-progress --out $(STUDY_OUT)

clean:
	rm -rf $(VENV) runs demo_data .cache
