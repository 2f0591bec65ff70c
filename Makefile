# Everything pip does not do: system packages, the venv, (later) the C helper.
# `make demo` sets everything up and runs the main job; `make test` runs the tests.

PYTHON_SYS ?= /usr/bin/python3
VENV       ?= .venv
PY         := $(VENV)/bin/python
APT_PACKAGES := python3 python3-venv python3-dev gcc make \
	squashfs-tools squashfs-tools-ng zstd xfsprogs util-linux \
	docker-registry skopeo umoci apache2-utils busybox-static \
	munge libmunge-dev openssh-server openssh-client attr

.PHONY: setup apt venv demo test lint bench-pull clean

setup: apt venv

# Installs only what is missing, so a second run costs a dpkg query.
apt:
	@missing=$$(for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; \
	done); \
	if [ -n "$$missing" ]; then \
		echo "apt-get install $$missing"; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[gateway,test]'
	touch $@

demo: setup
	$(PY) tests/world/demo.py

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q -rs $(PYTEST_ARGS)

lint: venv
	$(PY) -m ruff check .

bench-pull: setup
	$(PY) bench/pull

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
