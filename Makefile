# rayalign: set-up, demo and tests. Everything installs into .venv from requirements.lock.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
DEMO    ?= runs/demo
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast test-unit test-e2e bench clean-demo

setup: $(STAMP)

# A fresh venv, the pinned packages without their own dependency resolution (so no PyPI
# torchvision/torchaudio/torchcodec lands beside the CPU torch), then rayalign itself.
$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check pip==26.3
	$(PY) -m pip install --quiet --no-deps -r requirements.lock
	$(PY) -m pip install --quiet --no-deps -e .
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
	touch $(STAMP)

# The main job, on an embedded local Ray instance, CPU only: a tiny DPO run, a tiny GRPO run,
# then the RLHF pipeline (SFT -> reward model -> PPO, and SFT -> DPO; done stages are skipped).
demo: $(STAMP)
	test -f $(DEMO)/model/config.json || $(VENV)/bin/rayalign tiny-model $(DEMO)/model --size small
	test -f $(DEMO)/data/sft.jsonl || $(VENV)/bin/rayalign synthetic-data $(DEMO)/data \
		--train 1000 --eval 128 --min-words 4 --max-words 16
	$(VENV)/bin/rayalign train configs/dpo-tiny.yaml run_dir=$(DEMO)/dpo checkpoint.resume=never
	$(VENV)/bin/rayalign train configs/grpo-tiny.yaml run_dir=$(DEMO)/grpo
	$(VENV)/bin/rayalign pipeline configs/rlhf-tiny.yaml run_dir=$(DEMO)/rlhf

# Unit and end-to-end tests (CI runs this target): two pytest workers, each taking whole test
# files (a module's shared Ray and fixtures stay in one process), then the `serial` tests
# alone. Both parts always run; the target fails if either does.
test: $(STAMP)
	status=0; \
	$(PY) -m pytest tests -m "(unit or e2e) and not serial" -n 2 --dist loadfile \
		--durations=40 $(PYTEST_ARGS) || status=$$?; \
	$(PY) -m pytest tests -m "(unit or e2e) and serial" --durations=10 $(PYTEST_ARGS) \
		|| status=$$?; \
	exit $$status

# Unit tests plus one short end-to-end run (SFT under ZeRO-3, stopped and resumed): a few minutes.
test-fast: $(STAMP)
	$(PY) -m pytest tests -m "unit or smoke" $(PYTEST_ARGS)

test-unit: $(STAMP)
	$(PY) -m pytest tests -m unit $(PYTEST_ARGS)

test-e2e: $(STAMP)
	$(PY) -m pytest tests -m e2e $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/dpo_throughput.py

clean-demo:
	rm -rf $(DEMO)
