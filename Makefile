# tga: set-up, tests and the built-in demo. `make demo` and `make test` work on a fresh clone (they install first).
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export DS_BUILD_OPS ?= 0
# The install skips byte-compiling every installed module (torch and transformers alone are 5,000 files, 80 s of a
# fresh install on 2 cores); Python then compiles and caches only what tga imports, on first use, so make's commands
# write bytecode even where the environment says not to.
export PYTHONDONTWRITEBYTECODE :=
PIP_INSTALL := $(BIN)/pip install --quiet --no-compile
# demo phases side by side, each with cores / jobs threads (same numbers; on 2 cores no faster, see docs/demo.md)
DEMO_JOBS ?= 1

.PHONY: install eval-env t4-env test test-fast demo demo-seeds demo-models demo-tiny lint format clean

install: $(STAMP)

# torch is installed first and pinned: an unpinned resolve pulls another build (see docs/installation.md).
$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel
	$(PIP_INSTALL) torch==2.14.1 torchvision==0.29.1
	$(PIP_INSTALL) -e ".[dev,serve]"
	touch $(STAMP)

# lmms-eval in its own environment layered on $(VENV): a .pth file puts the project's packages behind its own, so it
# runs on the project's torch and transformers while its pins (wandb, filelock<4) stay out of $(VENV); see
# requirements-eval.txt. tests/test_lmms_eval.py runs it on a tiny exported model.
EVAL_VENV ?= .venv-eval
EVAL_STAMP := $(EVAL_VENV)/.installed

eval-env: $(EVAL_STAMP)

# A virtualenv layered on $(VENV): $(call layered_env,FOLDER,REQUIREMENTS)
define layered_env
	$(PYTHON) -m venv $(1)
	$(BIN)/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" \
		> "$$($(1)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/tga_base_env.pth"
	$(1)/bin/pip install --quiet --no-compile -r $(2)
	touch $(1)/.installed
endef

$(EVAL_STAMP): requirements-eval.txt $(STAMP)
	$(call layered_env,$(EVAL_VENV),requirements-eval.txt)

# transformers 4.57.1 in its own environment layered on $(VENV) the same way (requirements-t4.txt): the project runs
# on transformers 5; tests/test_export_transformers4.py loads `tga export --layout transformers4` folders in this one.
T4_VENV ?= .venv-t4
T4_STAMP := $(T4_VENV)/.installed

t4-env: $(T4_STAMP)

$(T4_STAMP): requirements-t4.txt $(STAMP)
	$(call layered_env,$(T4_VENV),requirements-t4.txt)

# `make test` is the whole suite (CI: .ci/run); `make test-fast` leaves out the tests marked slow (end-to-end demo
# runs, the installed package), distributed (2 DeepSpeed CPU ranks) and gpu (pyproject.toml). Both list the slowest.
PYTEST := $(BIN)/pytest -q --durations=15

test: install eval-env t4-env
	$(PYTEST)

test-fast: install
	$(PYTEST) -m "not slow and not distributed and not gpu"

# The built-in safety-transfer demo (docs/demo.md): the synthetic world, its tiny CLIP and text LLM, then every method
# of configs/demo/demo.yaml (LLaVA baseline, TGA, contrastive alignment, textual unlearning) through both stages,
# evaluated after each; report in runs/demo/report.md. `make demo` trains with seed 0; `make demo-seeds` with the
# plan's three seeds (reusing seed 0). Finished phases are reused on a rerun.
demo: install
	$(BIN)/tga demo --out runs/demo --seeds 0 --jobs $(DEMO_JOBS)

demo-seeds: install
	$(BIN)/tga demo --out runs/demo --jobs $(DEMO_JOBS)

# Retrain the demo world's CLIP and text LLM (~12 minutes on 2 cores) and ship them in tga/demo/prebuilt/, which
# `make demo` copies instead of training when their spec matches (docs/demo.md).
demo-models: install
	$(BIN)/tga demo-assets --out runs/demo-models --train_models
	rm -rf tga/demo/prebuilt/clip tga/demo/prebuilt/llm
	cp -r runs/demo-models/clip runs/demo-models/llm tga/demo/prebuilt/

# The tiny CPU recipe end to end: both stages under DeepSpeed ZeRO-3 on 2 CPU ranks with TGA, then a generation.
demo-tiny: install
	$(BIN)/tga data make-tiny runs/tiny/assets
	$(BIN)/deepspeed --num_gpus 2 scripts/pretrain.py configs/pretrain/tiny_cpu_tga.yaml --save_full_model true
	$(BIN)/deepspeed --num_gpus 2 scripts/finetune.py configs/finetune/tiny_cpu_tga.yaml
	$(BIN)/tga chat --model runs/tiny/finetune_tga --image runs/tiny/assets/data/images/img_0001.png \
		"What colour is the shape?" --max_new_tokens 16

lint: install
	$(BIN)/ruff check tga tests scripts benchmarks research

format: install
	$(BIN)/ruff format tga tests scripts benchmarks research

clean:
	rm -rf runs
