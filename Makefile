# Quick start:  make demo  (set up, then run the main job on the embedded default)
#               make test  (set up, then run the test suite)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= outputs

.PHONY: setup demo demo-cfg sample-check cotrain-bench test test-all checkpoints clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[dev]"
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
