# distillbench — `make bench METHOD=kd` runs a benchmark, `make test` runs the tests.
# Both create .venv and install the suite on first use.

PYTHON    ?= python3
VENV      ?= .venv
PY        := $(VENV)/bin/python
STAMP     := $(VENV)/.installed

METHOD    ?= kd
PROTOCOL  ?= digits
PAIR      ?=
SEEDS     ?= 0
DEVICES   ?= 1
NUM_NODES ?= 1
ACCELERATOR ?= auto
PRECISION ?= 32-true
EPOCHS    ?=
TEACHER_EPOCHS ?=
DATA_ROOT ?=
RESULTS   ?= results
FORCE     ?=
RESUME    ?=
CKPT_EVERY ?=
SET       ?=
VARIANT   ?=
PYTEST_ARGS ?=
TEACHER_CACHE ?=
AUGMENT   ?=
CROPS     ?=
LIMIT     ?=
TEACHER   ?=
BUDGET    ?=
OUT       ?= leaderboards
WANDB     ?=
COMPILE   ?=
GPU_AUGMENT ?=
PERF_ARGS ?=

export DISTILLBENCH_TEACHERS ?= $(CURDIR)/teachers
export DATA_ROOT

RUN_ARGS = --method $(METHOD) --protocol $(PROTOCOL) --seeds $(SEEDS) --devices $(DEVICES) --num-nodes $(NUM_NODES) \
	--accelerator $(ACCELERATOR) --precision $(PRECISION) --results $(RESULTS) \
	$(if $(PAIR),--pair $(PAIR)) $(if $(EPOCHS),--epochs $(EPOCHS)) $(if $(FORCE),--force) \
	$(if $(TEACHER_EPOCHS),--teacher-epochs $(TEACHER_EPOCHS)) \
	$(if $(RESUME),--resume) $(if $(CKPT_EVERY),--checkpoint-every $(CKPT_EVERY)) \
	$(if $(VARIANT),--variant $(VARIANT)) $(foreach s,$(SET),--set $(s)) \
	$(if $(TEACHER_CACHE),--teacher-cache $(TEACHER_CACHE)) $(if $(AUGMENT),--augment $(AUGMENT)) \
	$(if $(CROPS),--crops $(CROPS)) $(if $(COMPILE),--compile $(COMPILE)) \
	$(if $(GPU_AUGMENT),--gpu-augment)

.PHONY: install bench search teachers softlabels leaderboard perf gpu-check test parity lint list clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

bench: $(STAMP)
	$(PY) -m distillbench.benchmark run $(RUN_ARGS)

# a method's search stage alone (DisWOT): prints the top candidates, writes the search record
search: $(STAMP)
	$(PY) -m distillbench.benchmark search --method $(METHOD) --protocol $(PROTOCOL) --seeds $(SEEDS) \
		--results $(RESULTS) $(if $(PAIR),--pair $(PAIR)) $(if $(TEACHER),--teacher $(TEACHER)) \
		$(if $(BUDGET),--budget $(BUDGET)) $(foreach s,$(SET),--set $(s))

teachers: $(STAMP)
	$(PY) -m distillbench.benchmark teachers --protocol $(PROTOCOL) --accelerator $(ACCELERATOR) \
		--devices $(DEVICES) --num-nodes $(NUM_NODES) $(if $(FORCE),--force) $(if $(TEACHER_EPOCHS),--teacher-epochs $(TEACHER_EPOCHS))

softlabels: $(STAMP)
	$(PY) -m distillbench.benchmark softlabels --protocol $(PROTOCOL) --accelerator $(ACCELERATOR) \
		$(if $(PAIR),--pair $(PAIR)) $(if $(CROPS),--crops $(CROPS)) $(if $(LIMIT),--limit $(LIMIT))

# PROTOCOL filters only when given explicitly (its default, digits, is for `make bench`)
leaderboard: $(STAMP)
	$(PY) -m distillbench.leaderboards build --results $(RESULTS) --out $(OUT) \
		$(if $(filter command line environment,$(origin PROTOCOL)),--protocol $(PROTOCOL)) $(if $(WANDB),--wandb)

# distillation cost side by side (CPU, 1 thread): rewrites $(OUT)/performance.md (README, Performance)
perf: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m distillbench.benchmark.perf --protocol $(if $(filter command line environment,$(origin PROTOCOL)),$(PROTOCOL),fmnist) \
		--out $(OUT)/performance.md $(PERF_ARGS)

# on a machine with one CUDA GPU: KD and OFA throughput on cifar100 shapes, fp32 / bf16 / compiled (a few minutes)
gpu-check: $(STAMP)
	$(PY) -m distillbench.benchmark.gpu_check $(PERF_ARGS)

list: $(STAMP)
	$(PY) -m distillbench.benchmark list methods
	$(PY) -m distillbench.benchmark list protocols

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

# oracle parity with the official code (never vendored): OFFICIAL=<dir> holding checkouts <dir>/<RepoName>: DMAE/,
# G2SD/, mdistiller/, OFAKD/, Knowledge-Distillation-via-ND/, FKD/, DisWOT-CVPR2023/ (a missing one skips its tests)
parity: $(STAMP)
	$(if $(OFFICIAL),,$(error OFFICIAL=<dir> holding checkouts <dir>/<RepoName>: DMAE/ (UCSC-VLAA/DMAE), G2SD/ (pengzhiliang/G2SD), mdistiller/ (megvii-research/mdistiller), OFAKD/ (Hao840/OFAKD), Knowledge-Distillation-via-ND/ (WangYZ1608/Knowledge-Distillation-via-ND), FKD/ (szq0214/FKD), DisWOT-CVPR2023/ (lliai/DisWOT-CVPR2023) is required))
	DISTILLBENCH_OFFICIAL_CODE=$(abspath $(OFFICIAL)) $(PY) -m pytest -q -rs -s tests/test_official_parity.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean-venv:
	rm -rf $(VENV)
