# Everything pip does not do: system packages, the venv, (later) the C helper.
# `make demo` sets everything up and runs the main job; `make test` runs the tests.

PYTHON_SYS ?= /usr/bin/python3
VENV       ?= .venv
PY         := $(VENV)/bin/python
APT_PACKAGES := python3 python3-venv python3-dev gcc make \
	squashfs-tools squashfs-tools-ng zstd xfsprogs util-linux \
	docker-registry skopeo umoci apache2-utils busybox-static \
	munge libmunge-dev openssh-server openssh-client attr \
	bubblewrap charliecloud squashfuse fuse3 kmod libcap2-bin \
	mpich libmpich-dev patchelf slurm-wlm libslurm-dev clang libclang-rt-14-dev

.PHONY: setup apt venv install helper udiimage slurm demo test lint fuzz bench-pull \
	bench-launch bench-slurm clean docs-man

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

# The runtime, installed where every user can run it:
#   $(PREFIX)/libexec/shifter/shifter-helper   setuid root, mode run only (all a user can reach)
#   $(PREFIX)/libexec/shifter/shifter-setup    root:root 0700, never setuid: setupRoot's and
#        unsetupRoot's program (prepared container, its sshd, hostsfile, teardown)
#   $(PREFIX)/lib/shifter/python/              udiroot + shifter, byte-compiled
#   $(PREFIX)/bin/shifter setupRoot unsetupRoot  `python3 -I -S` launchers: no site-packages,
#        no venv, no pyenv shim on the path that runs once per task (see bench/launch)
#   $(PREFIX)/bin/shifter-prep-mpi            the same kind of launcher (site admin tools)
#   $(PREFIX)/bin/shifter-prep-udiimage
#   $(UDIIMAGE)                               the optUdiImage tree (copied into every container
#        as /opt/udiImage): Debian's sshd and ssh with their libraries, runnable in any
#        image (`make udiimage`; replaced on every install)
#   $(PREFIX)/bin/shifterimg                  the gateway client, from the project's venv
#   $(PREFIX)/lib/shifter/shifter_slurm.so    the Slurm SPANK plugin (slurm/; README "Slurm")
#   $(PREFIX)/libexec/shifter/shifter-spank   its submit-time checker, a `python3 -I -S` launcher
PREFIX  ?= /usr/local
PYLIB   := $(PREFIX)/lib/shifter/python
UDIIMAGE ?= /opt/shifter/udiImage
LAUNCHERS := shifter:shifter.launch setupRoot:shifter.setuproot unsetupRoot:shifter.setuproot:main_unsetup \
	shifter-prep-mpi:shifter.prep_mpi shifter-prep-udiimage:shifter.prep_udiimage

helper:
	$(MAKE) -C helpers

# The tree optUdiImage names (etc/udiRoot.conf.example: /opt/shifter/udiImage).
udiimage: setup
	mkdir -p $(dir $(UDIIMAGE))
	$(PYTHON_SYS) -I -c 'import sys; sys.path.insert(0, "$(CURDIR)"); \
		from shifter.prep_udiimage import main; sys.exit(main())' --out $(UDIIMAGE) --force

slurm:
	$(MAKE) -C slurm PREFIX=$(PREFIX)

install: setup helper udiimage slurm
	$(MAKE) -C helpers install PREFIX=$(PREFIX)
	$(MAKE) -C slurm install PREFIX=$(PREFIX)
	mkdir -p $(PREFIX)/bin
	rm -rf $(PYLIB).new && mkdir -p $(PYLIB).new
	cp -r udiroot shifter $(PYLIB).new/
	find $(PYLIB).new -name __pycache__ -prune -exec rm -rf {} +
	$(PYTHON_SYS) -I -m compileall -q $(PYLIB).new
	rm -rf $(PYLIB) && mv $(PYLIB).new $(PYLIB)
	chmod -R a+rX $(PREFIX)/lib/shifter
	for spec in $(LAUNCHERS); do \
		name=$${spec%%:*}; rest=$${spec#*:}; mod=$${rest%%:*}; fn=$${rest#*:}; \
		[ "$$fn" = "$$rest" ] && fn=main; \
		printf '#!%s -IS\nimport sys\nsys.path.insert(0, "%s")\nfrom %s import %s\nsys.exit(%s())\n' \
			$(PYTHON_SYS) $(PYLIB) $$mod $$fn $$fn > $(PREFIX)/bin/$$name.new; \
		chmod 755 $(PREFIX)/bin/$$name.new && mv $(PREFIX)/bin/$$name.new $(PREFIX)/bin/$$name; \
	done
	printf '#!/bin/sh\nexec %s/$(VENV)/bin/shifterimg "$$@"\n' $(CURDIR) > $(PREFIX)/bin/shifterimg
	chmod 755 $(PREFIX)/bin/shifterimg
	printf '#!%s -IS\nimport sys\nsys.path.insert(0, "%s")\nfrom shifter.spank import main\nsys.exit(main())\n' \
		$(PYTHON_SYS) $(PYLIB) > $(PREFIX)/libexec/shifter/shifter-spank.new
	chmod 755 $(PREFIX)/libexec/shifter/shifter-spank.new
	mv $(PREFIX)/libexec/shifter/shifter-spank.new $(PREFIX)/libexec/shifter/shifter-spank

demo: install
	$(PY) tests/world/demo.py

# After pytest (its status is kept): a short fuzzing run (TEST_FUZZ_SECONDS per target),
# then the setuid audit, each run whatever came before and each failing the target.
TEST_FUZZ_SECONDS ?= 5
test: setup
	$(PY) -m ruff check .
	@rc=0; $(PY) -m pytest -q -rs $(PYTEST_ARGS) || rc=$$?; \
	$(MAKE) -s fuzz FUZZ_SECONDS=$(TEST_FUZZ_SECONDS) || { [ $$rc -ne 0 ] || rc=1; }; \
	$(PY) tests/setuid_audit.py --prefix $(PREFIX) || { [ $$rc -ne 0 ] || rc=1; }; \
	exit $$rc

# libFuzzer targets for every parser of user-reachable input (helpers/fuzz/; README
# "Tests"): each runs FUZZ_SECONDS, then `fuzz: targets=N execs=N crashes=N`.
FUZZ_SECONDS ?= 60
fuzz:
	$(MAKE) -s -C helpers fuzz FUZZ_SECONDS=$(FUZZ_SECONDS)

lint: venv
	$(PY) -m ruff check .

# Man pages and bash completion, generated from the commands' parsers (build output):
#   build/man/man1/<command>.1, build/completion/bash/<command>
docs-man: venv
	$(PY) tools/cli_docs.py build

bench-pull: setup
	$(PY) bench/pull

bench-launch: install
	$(PYTHON_SYS) bench/launch

bench-slurm: install
	$(PY) bench/slurm

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
