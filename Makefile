# Every target uses .venv, creating it only when missing; the editable install is redone only
# when the packaging files or the C kernels change.
PY := .venv/bin/python
STAMP := .venv/.dinat-installed

.PHONY: demo test bench bench-cuda lint install

install: $(STAMP)

.venv/bin/python:
	python3 -m venv .venv
	$(PY) -m pip install --upgrade pip setuptools wheel

$(STAMP): .venv/bin/python pyproject.toml setup.py src/dinat/ops/csrc/na_cpu.c src/dinat/ops/csrc/na_kernels.h
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	rm -rf output/demo
	.venv/bin/dinat train --dataset digits -c configs/demo_digits.yml --output output/demo

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile tests

# The CUDA figures: both CUDA attention backends (triton, the default, and flex) against window
# attention at every DiNAT-Mini level, and dinat_mini's training step (on each) against Swin-T's
# (bfloat16, batch 128); it ends with the tile Triton's autotuner picked for each kernel and shape.
CUDA_BENCH := -m dinat.cli bench --device cuda --dtype bfloat16 --batch 128 --repeats 20 --no-reference \
	--compare flex --models dinat_mini dinat_mini@flex swin_tiny_patch4_window7_224 --output bench_results/cuda
HAS_CUDA = $(shell $(PY) -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null)

CUDA_TESTS := tests/test_ops_golden.py tests/test_ops_grouped.py tests/test_ops_flex.py tests/test_ops_triton.py \
	tests/test_ops_triton_unfused.py

# On a machine with a CUDA GPU the CUDA figures, else the CPU ones.
bench: $(STAMP)
	$(if $(filter 1,$(HAS_CUDA)),$(PY) $(CUDA_BENCH),$(PY) -m dinat.cli bench --output bench_results)

# The CUDA op tests and the CUDA figures, eager and with CUDA graphs (benchmarks/cuda_check.sh; on
# the device machine, without the venv: the command in BENCHMARKS.md, "GPU").
bench-cuda: $(STAMP)
	NO_LIMITS=1 CUDA_TESTS="$(CUDA_TESTS)" benchmarks/cuda_check.sh bench_results/cuda $(PY)

lint: $(STAMP)
	.venv/bin/ruff check src tests benchmarks
	.venv/bin/ruff format --check src tests benchmarks
