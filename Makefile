# vllm-speech: build vLLM 0.26.0 with the speech patch set, run it, test it.
# `make demo` and `make test` are the two commands of the README.

PYTHON ?= python3
VENV   ?= $(CURDIR)/.venv
TREE   := build/vllm-0.26.0
VPY    := $(VENV)/bin/python
# Tests of vLLM's own registry suite that import CUDA-only custom ops at
# module level (torch.ops._C.rms_norm_static_fp8_quant): not runnable on a
# CPU build of vLLM, patched or not.
GPU_ONLY_REGISTRY_TESTS := \
	--deselect "tests/models/test_registry.py::test_registry_imports[MiniMaxM3SparseForCausalLM]" \
	--deselect "tests/models/test_registry.py::test_registry_imports[MiniMaxM3SparseForConditionalGeneration]" \
	--deselect "tests/models/test_registry.py::test_registry_imports[MiniMaxM3MTP]"
SPEECH_TESTS = $(wildcard $(TREE)/tests/models/speech)

.PHONY: build prepare demo serve test test-build test-vllm bench device-overlay \
        build-kernels upstream-diff check-patches clean

build:                 ## venv + pinned sdist + overlays + patches + install
	VENV=$(VENV) $(PYTHON) setup.py build

prepare:               ## re-stage build/vllm-0.26.0 after editing overlays/patches
	$(PYTHON) setup.py prepare

demo: build            ## the main job on the embedded demo checkpoint
	$(VPY) tools/demo.py --out demo-out

serve: build           ## serve MODEL=<checkpoint dir> on port 8000
	cd /tmp && PYTHONSAFEPATH=1 $(VPY) -m vllm.entrypoints.openai.api_server \
	    --model $(MODEL) --port 8000 $(SERVE_ARGS)

test: build            ## everything CI runs
	$(MAKE) test-build test-vllm

test-build:
	$(VENV)/bin/pytest -q -p no:cacheprovider tests/build

test-vllm:             ## vLLM's registry tests + the speech model tests, in the patched tree
	cd $(TREE) && $(VENV)/bin/pytest -q -p no:cacheprovider \
	    tests/models/test_registry.py $(GPU_ONLY_REGISTRY_TESTS) \
	    $(patsubst $(TREE)/%,%,$(SPEECH_TESTS))

bench:                 ## GPU benchmarks: see benchmarks/README.md
	@cat benchmarks/README.md

device-overlay:        ## patch an installed stock vLLM (SITE=/tmp/devsite), offline
	$(PYTHON) setup.py device-overlay --site $(or $(SITE),/tmp/devsite)

build-kernels:         ## compile csrc/speech (CUDA) into SITE's vllm/ with CMake
	$(PYTHON) setup.py build-kernels --site $(or $(SITE),/tmp/devsite)

upstream-diff:         ## build/vllm-speech.diff: the whole patch set as one PR diff
	$(PYTHON) setup.py upstream-diff -o build/vllm-speech.diff

check-patches:
	$(PYTHON) setup.py check-patches

clean:
	rm -rf build demo-out
