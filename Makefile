# Two commands do everything on a fresh machine: `make demo` and `make test`.
# The environment lives in .venv; uv (installed into it by pip) resolves the dependencies,
# with the overrides that cashu needs (pyproject.toml, [tool.uv]).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Machines that point pip at a local CPU build of torch (PIP_FIND_LINKS) get that build, not
# the multi-gigabyte CUDA one; elsewhere (a GPU server) torch comes from PyPI as usual.
TORCH_WHEEL := $(firstword $(wildcard $(addsuffix /torch-*.whl,$(subst :, ,$(PIP_FIND_LINKS)))))
TORCH_PIN := $(if $(TORCH_WHEEL),torch==$(firstword $(subst +, ,$(word 2,$(subst -, ,$(notdir $(TORCH_WHEEL)))))))
export UV_FIND_LINKS ?= $(PIP_FIND_LINKS)

.PHONY: demo test test-all venv js clean

$(STAMP): pyproject.toml examples/dvm-textstats/pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade uv
	echo "$(TORCH_PIN)" > $(VENV)/constraints.txt
	# --compile-bytecode: where PYTHONDONTWRITEBYTECODE is set (this kind of machine), every
	# import would otherwise compile from source: torch alone took 7-10 s per process.
	$(BIN)/uv pip install --python $(BIN)/python --compile-bytecode -c $(VENV)/constraints.txt \
		-e '.[train,dev]' -e examples/dvm-textstats
	touch $@

venv: $(STAMP)

tests/js/node_modules/.installed: tests/js/package.json
	cd tests/js && npm install --no-audit --no-fund --loglevel=error
	touch $@

js: tests/js/node_modules/.installed

demo: $(STAMP)
	$(BIN)/dvm demo

# The test files run in PYTEST_WORKERS processes at once (pytest-xdist; one file stays in one
# process, with its fixtures): most tests wait on relays, mints and child processes. 0: one process.
PYTEST_WORKERS ?= 3
PYTEST_XDIST = -n $(PYTEST_WORKERS) --dist loadfile

test: $(STAMP) js
	$(BIN)/python -m pytest -q -ra $(PYTEST_XDIST) $(PYTEST_ARGS)

# Everything: the slow examples and the whole fault matrix too.
test-all: $(STAMP) js
	$(BIN)/python -m pytest -q -ra $(PYTEST_XDIST) -m "slow or not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) tests/js/node_modules
