# Quick start: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test test-fast proto demo bench bench-full bench-peers clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch and torchvision first, pinned to a matching pair (see README).
	$(PY) -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

# The offline demo: local stack on the bundled demo model, sample images, three queries.
demo: $(STAMP)
	$(VENV)/bin/clipsearch demo

test: $(STAMP)
	$(PY) -m pytest

# The edit loop (~15 s on 2 cores): unit and in-process tests only, no service processes.
# `make test` still runs them all (CI too).
FAST_TESTS := tests/test_admission.py tests/test_names.py tests/test_paging.py tests/test_status.py \
	tests/test_image_formats.py tests/test_protos.py tests/test_docs.py tests/test_server_plumbing.py \
	tests/gateway/test_search_logic.py tests/gateway/test_engine.py tests/gateway/test_auth_unit.py \
	tests/gateway/test_admission.py tests/gateway/test_settings.py tests/gateway/test_structure.py \
	tests/gateway/test_shards.py tests/gateway/test_storage.py tests/cli/test_repair_units.py \
	tests/index/test_inline_search.py tests/encoder/test_engine.py
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(FAST_TESTS)

# Benchmarks (bench/run_all.py): every row with its same-run baseline and ratio, then a
# summary table; results in bench/results/. Quick: 100k vectors, ~5.5 min on 2 quiet cores.
bench: $(STAMP)
	$(PY) -m bench.run_all

# Full: 1M vectors, ~9 min and ~10 GiB of memory on 2 cores.
bench-full: $(STAMP)
	$(PY) -m bench.run_all --full

# clipsearch's index service against Milvus Lite and Chroma (bench/peers.py): 100k x 512,
# ~10-15 min on 2 cores; the peers install into .venv-peers on first use. Full: --n 500000.
bench-peers: $(STAMP)
	$(PY) -m bench.peers

# The one command that generates the Python stubs; tests/test_protos.py runs it too.
# google/api/*.proto (the google.api.http annotations) come from googleapis-common-protos,
# whose wheel ships them next to its generated modules (imported, not regenerated).
GOOGLEAPIS = $$($(PY) -c 'import pathlib, google.api.annotations_pb2 as m; print(pathlib.Path(m.__file__).parents[2])')
proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -Iprotos -I$(GOOGLEAPIS) --python_out=clients/python --pyi_out=clients/python \
		--grpc_python_out=clients/python $$(find protos -name '*.proto' | sort)

clean:
	rm -rf $(VENV) build *.egg-info
