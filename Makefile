# Quick start: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test proto demo bench bench-full clean

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

# The one command that generates the Python stubs; tests/test_protos.py runs it too.
proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=clients/python --pyi_out=clients/python \
		--grpc_python_out=clients/python $$(find protos -name '*.proto' | sort)

clean:
	rm -rf $(VENV) build *.egg-info
