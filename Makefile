# Every command of the repository. `make help` lists them.
#
# By default everything runs in .venv (created by `make install`). To use an environment of your own:
#   pip install -r requirements.txt && make demo PYTHON=python

VENV ?= .venv
PYTHON ?= $(VENV)/bin/python
MODEL ?= llava
CONFIG ?=
ACCELERATE_CONFIG ?= accelerate_configs/zero3_offload.yaml
ARGS ?=
PART ?=
WHEELHOUSE ?= wheelhouse
WHEEL_TARGET ?=
WHEEL_ARGS ?=
# One process per GPU; with no GPU, 2 CPU processes over gloo (the real distributed path).
NUM_PROCESSES ?= $(shell n=$$(nvidia-smi -L 2>/dev/null | grep -c '^GPU'); [ "$${n:-0}" -gt 0 ] && echo $$n || echo 2)

RECIPE = recipes/$(subst -,_,$(MODEL)).py
# The recipe YAMLs name ds_configs/zero3_offload.json; an accelerate config that runs neither DeepSpeed nor FSDP
# (single_gpu.yaml, multi_gpu.yaml) cannot say so to the recipe, so `make train` adds --deepspeed none for it.

ifeq ($(PYTHON),$(VENV)/bin/python)
INSTALLED := $(VENV)/.installed
else
INSTALLED :=
endif

.PHONY: help install demo train test test-extended test-gpu multi-gpu lint format clean wheelhouse benchmark benchmark-data update-quality

help:  ## list the commands
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

install: $(INSTALLED)  ## create .venv and install requirements (+ this repo's package) and the dev tools

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --upgrade pip
	$(PYTHON) -m pip install -r requirements-dev.txt
	$(PYTHON) scripts/build_deepspeed_ops.py
	touch $@

demo: $(INSTALLED)  ## tiny model + demo data, trained with the real launcher and ZeRO-3 offload config
	PYTHON=$(PYTHON) NUM_PROCESSES=$(NUM_PROCESSES) ACCELERATE_CONFIG=$(ACCELERATE_CONFIG) \
		bash scripts/demo.sh $(MODEL)

# make train launches with the memory planner's fastest config that fits this machine (plan_memory.py --pick: its
# GPUs, their memory, host RAM, the YAML's model, mode, batch and length), printing which and why; a given
# ACCELERATE_CONFIG (command line or environment) is used as it is. Without a GPU: the shared ZeRO-3 offload config.
FORCED_ACCELERATE_CONFIG = $(if $(filter file,$(origin ACCELERATE_CONFIG)),,$(ACCELERATE_CONFIG))
TRAIN_YAML = $(or $(CONFIG),recipes/configs/$(subst -,_,$(MODEL)).yaml)

train: $(INSTALLED)  ## fine-tune with the fastest config that fits: make train MODEL=llava|qwen-vl|chexagent|image-text-to-text [CONFIG=...] [ARGS="..."] [ACCELERATE_CONFIG=...]
	@config="$(FORCED_ACCELERATE_CONFIG)"; \
	[ -n "$$config" ] || config=$$($(PYTHON) scripts/plan_memory.py --pick --config $(TRAIN_YAML) --gpus $(NUM_PROCESSES)) || exit 1; \
	grep -qE '^distributed_type: *"?(DEEPSPEED|FSDP)' "$$config" || no_deepspeed="--deepspeed none"; \
	echo "$(PYTHON) -m accelerate.commands.accelerate_cli launch --config_file $$config --num_processes $(NUM_PROCESSES) $(RECIPE) $(if $(CONFIG),--config $(CONFIG)) $$no_deepspeed $(ARGS)"; \
	$(PYTHON) -m accelerate.commands.accelerate_cli launch --config_file "$$config" --num_processes $(NUM_PROCESSES) \
		$(RECIPE) $(if $(CONFIG),--config $(CONFIG)) $$no_deepspeed $(ARGS)

test: $(INSTALLED)  ## the test suite, real 2-process ZeRO-3 runs included (11-16 minutes on 2 cores without AVX-512)
	$(PYTHON) -m pytest --durations=25

test-extended: $(INSTALLED)  ## the cases left out of `make test`: benchmark-sized checks, other ZeRO variants and model families of its runs
	$(PYTHON) -m pytest -m extended

test-gpu: $(INSTALLED)  ## on CUDA: the tiny end-to-end tests in bf16 then fp16, one process per GPU; results in runs/test-gpu/ [ARGS="-k llava"] [WORKERS=7]
	PYTHON=$(PYTHON) NUM_PROCESSES=$(NUM_PROCESSES) WORKERS=$(WORKERS) bash scripts/test_gpu.sh $(ARGS)

multi-gpu: $(INSTALLED)  ## on 2+ GPUs: PART=tests (multi-process tests over NCCL) or PART=benchmark (zero3_offload on 1 vs N GPUs) [ARGS=...]
	PYTHON=$(PYTHON) bash scripts/validate_multi_gpu.sh $(PART) $(ARGS)

wheelhouse: $(INSTALLED)  ## wheels for an air-gapped node: [WHEELHOUSE=dir] [WHEEL_TARGET="--python-version 3.12 --platform ..."] [WHEEL_ARGS="--have node_freeze.txt --only deepspeed"]
	$(PYTHON) scripts/build_wheelhouse.py --out $(WHEELHOUSE) --target "$(WHEEL_TARGET)" $(WHEEL_ARGS)

benchmark: $(INSTALLED)  ## on a GPU: make benchmark ARGS="--model qwen2.5-vl-3b --configs seed,zero2_offload" (docs/benchmarks.md)
	$(PYTHON) scripts/benchmark.py run $(ARGS)

update-quality: $(INSTALLED)  ## on CPU: loss curves of fp32 / plain bf16 / compensated bf16 AdamW at lr 2e-5 (docs/benchmarks.md) [ARGS=...]
	$(PYTHON) scripts/update_quality.py --out docs/benchmarks/update_quality $(ARGS)

benchmark-data: $(INSTALLED)  ## the data path at scale, on CPU: make benchmark-data ARGS="--records 100000" (docs/benchmarks.md)
	$(PYTHON) scripts/benchmark_data.py $(ARGS)

lint: $(INSTALLED)  ## ruff lint and format check
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format: $(INSTALLED)  ## ruff format and autofix
	$(PYTHON) -m ruff format .
	$(PYTHON) -m ruff check --fix .

clean:  ## remove run outputs (runs/); keeps .venv
	rm -rf runs
