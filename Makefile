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
	mpich libmpich-dev patchelf slurm-wlm libslurm-dev clang libclang-rt-14-dev \
	openmpi-bin libopenmpi-dev libpmix2 libpmix-dev \
	debootstrap rpm dpkg-dev iproute2 sshfs linux-perf

.PHONY: setup apt venv install helper udiimage slurm demo test lint fuzz bench-pull \
	bench-launch bench-slurm clean docs-man

setup: apt venv

# Open MPI outranks MPICH for the generic names (mpiexec, mpicc, mpi.h, libmpi.so); the
# MPICH tests use those names, the Open MPI ones say mpicc.openmpi: keep them MPICH's.
MPICH_NAMES := { ! dpkg-query -W mpich >/dev/null 2>&1 || { \
	update-alternatives --set mpi /usr/bin/mpicc.mpich && \
	update-alternatives --set mpirun /usr/bin/mpirun.mpich && \
	update-alternatives --set mpi-x86_64-linux-gnu /usr/include/x86_64-linux-gnu/mpich; }; }

# Installs only what is missing, so a second run costs a dpkg query.
apt:
	@missing=$$(for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; \
	done); \
	if [ -n "$$missing" ]; then \
		echo "apt-get install $$missing"; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing \
			&& $(MPICH_NAMES); \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[gateway,test]'
	touch $@

# What `make install` and the packages put where (PREFIX /usr/local by default; the
# packages use /usr; DESTDIR stages everything under another root):
#   runtime (compute and login nodes)
#     $(PREFIX)/libexec/shifter/                 what `make -C helpers install` installs:
#                                                shifter-helper, setuid root, run mode only (all
#                                                a user can reach); shifter-setup, root:root
#                                                0700, never setuid (setupRoot's, unsetupRoot's)
#     $(PREFIX)/lib/shifter/python/              udiroot + shifter (+ imagegw.munge for
#                                                shifterimg), byte-compiled
#     $(PREFIX)/bin/shifter setupRoot unsetupRoot shifter-prep-mpi shifter-prep-udiimage
#                                                `python3 -I -S` launchers: no site-packages,
#                                                no venv, no pyenv shim (see bench/launch)
#     $(PREFIX)/bin/shifterimg                   `python3 -I` launcher (Debian's python3-requests)
#     $(PREFIX)/sbin/shifter-etc-sync            etcPath's passwd/group from getent (root)
#     $(UDIIMAGE)                                the optUdiImage tree: the builder's sshd and ssh
#                                                with their libraries, runnable in any image
#     $(UNITDIR)/shifter-etc-sync.{service,timer}
#   slurm
#     $(PREFIX)/lib/shifter/shifter_slurm.so     the SPANK plugin, against SLURM_PREFIX's headers
#     $(PREFIX)/libexec/shifter/shifter-spank    its submit-time checker (`python3 -I -S`)
#   gateway (`make install-gateway`; not part of `make install`)
#     $(GWVENV)                                  a venv with the project and its `gateway` extra
#     $(UNITDIR)/shifter-imagegw.service, shifter-imagegw-autoexpire.{service,timer}
# `make install` needs only the build tools of BUILD_PACKAGES (`make build-deps`), never
# the test tools of `make setup`.
PREFIX   ?= /usr/local
DESTDIR  ?=
PYLIB    := $(PREFIX)/lib/shifter/python
UDIIMAGE ?= /opt/shifter/udiImage
GWVENV   ?= /opt/shifter/gateway
UNITDIR  ?= $(PREFIX)/lib/systemd/system
SLURM_PREFIX ?=
VERSION  := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
D        := $(if $(DESTDIR),$(abspath $(DESTDIR)))
LAUNCHERS := shifter:shifter.launch setupRoot:shifter.setuproot unsetupRoot:shifter.setuproot:main_unsetup \
	shifter-prep-mpi:shifter.prep_mpi shifter-prep-udiimage:shifter.prep_udiimage
# Building: the C compiler, the udiImage sources (sshd, patchelf), the Slurm and munge
# headers, the package builders. A node needs none of these (what each role depends on
# is in packaging/deb.sh and packaging/shifter.spec).
BUILD_PACKAGES := python3 python3-venv python3-requests gcc make libc6-dev patchelf \
	openssh-server openssh-client libslurm-dev libmunge-dev dpkg-dev rpm

.PHONY: build-deps install install-runtime install-slurm install-gateway packages deb rpm

build-deps:
	@$(MAKE) -s apt APT_PACKAGES="$(BUILD_PACKAGES)"

helper:
	$(MAKE) -C helpers PREFIX=$(PREFIX)

# The tree optUdiImage names (etc/udiRoot.conf.example: /opt/shifter/udiImage).
udiimage:
	mkdir -p $(dir $(D)$(UDIIMAGE))
	$(PYTHON_SYS) -I -c 'import sys; sys.path.insert(0, "$(CURDIR)"); \
		from shifter.prep_udiimage import main; sys.exit(main())' --out $(D)$(UDIIMAGE) --force

slurm:
	$(MAKE) -C slurm PREFIX=$(PREFIX) SLURM_PREFIX=$(SLURM_PREFIX)

# launcher NAME MODULE FUNCTION FLAGS DIR: a script that runs MODULE.FUNCTION from PYLIB.
launcher = printf '\#!%s %s\nimport sys\nsys.path.insert(0, "%s")\nfrom %s import %s\nsys.exit(%s())\n' \
	$(PYTHON_SYS) $(4) $(PYLIB) $(2) $(3) $(3) > $(D)$(5)/$(1).new && \
	chmod 755 $(D)$(5)/$(1).new && mv $(D)$(5)/$(1).new $(D)$(5)/$(1)

install: install-runtime install-slurm

install-runtime: helper udiimage
	$(MAKE) -C helpers install PREFIX=$(PREFIX) DESTDIR=$(D)
	mkdir -p $(D)$(PREFIX)/bin $(D)$(PREFIX)/sbin $(D)$(UNITDIR)
	rm -rf $(D)$(PYLIB).new && mkdir -p $(D)$(PYLIB).new/imagegw
	cp -r udiroot shifter $(D)$(PYLIB).new/
	cp imagegw/__init__.py imagegw/munge.py $(D)$(PYLIB).new/imagegw/
	find $(D)$(PYLIB).new -name __pycache__ -prune -exec rm -rf {} +
	# The front ends find the helper where this install puts it.
	grep -rl '/usr/local/libexec/shifter/' $(D)$(PYLIB).new | xargs -r sed -i \
		's|/usr/local/libexec/shifter/|$(PREFIX)/libexec/shifter/|g'
	$(PYTHON_SYS) -I -m compileall -q -s $(D)$(PYLIB).new -p $(PYLIB) $(D)$(PYLIB).new
	rm -rf $(D)$(PYLIB) && mv $(D)$(PYLIB).new $(D)$(PYLIB)
	chmod -R a+rX $(D)$(PREFIX)/lib/shifter
	for spec in $(LAUNCHERS); do \
		name=$${spec%%:*}; rest=$${spec#*:}; mod=$${rest%%:*}; fn=$${rest#*:}; \
		[ "$$fn" = "$$rest" ] && fn=main; \
		$(call launcher,$$name,$$mod,$$fn,-IS,$(PREFIX)/bin); \
	done
	$(call launcher,shifterimg,shifter.shifterimg,main,-I,$(PREFIX)/bin)
	$(call launcher,shifter-etc-sync,shifter.etc_sync,main,-IS,$(PREFIX)/sbin)
	sed 's|/usr/local/sbin/|$(PREFIX)/sbin/|' etc/shifter-etc-sync.service \
		> $(D)$(UNITDIR)/shifter-etc-sync.service
	cp etc/shifter-etc-sync.timer $(D)$(UNITDIR)/

install-slurm: slurm
	$(MAKE) -C slurm install PREFIX=$(PREFIX) SLURM_PREFIX=$(SLURM_PREFIX) DESTDIR=$(D)
	mkdir -p $(D)$(PREFIX)/libexec/shifter
	$(call launcher,shifter-spank,shifter.spank,main,-IS,$(PREFIX)/libexec/shifter)

# The gateway's own Python environment, built from pyproject's `gateway` extra (PyPI or
# the index pip is configured with). Built under DESTDIR, then its scripts and byte code
# are made to name GWVENV, where it will run.
install-gateway:
	rm -rf $(D)$(GWVENV)
	$(PYTHON_SYS) -m venv $(D)$(GWVENV)
	$(D)$(GWVENV)/bin/pip install -q --no-cache-dir '$(CURDIR)[gateway]'
	rm -f $(D)$(GWVENV)/bin/activate* $(D)$(GWVENV)/bin/Activate.ps1
	if [ -n "$(D)" ]; then \
		grep -rlI '$(D)$(GWVENV)' $(D)$(GWVENV)/bin $(D)$(GWVENV)/pyvenv.cfg | xargs -r sed -i 's|$(D)$(GWVENV)|$(GWVENV)|g'; \
		find $(D)$(GWVENV) -name __pycache__ -prune -exec rm -rf {} +; \
		$(D)$(GWVENV)/bin/python -m compileall -q -s $(D) -p / $(D)$(GWVENV)/lib; \
		! grep -rlI '$(D)' $(D)$(GWVENV) ; \
	fi
	mkdir -p $(D)$(UNITDIR)
	sed 's|/opt/shifter/gateway|$(GWVENV)|' etc/shifter-imagegw.service \
		> $(D)$(UNITDIR)/shifter-imagegw.service
	sed 's|/opt/shifter/gateway|$(GWVENV)|' etc/shifter-imagegw-autoexpire.service \
		> $(D)$(UNITDIR)/shifter-imagegw-autoexpire.service
	cp etc/shifter-imagegw-autoexpire.timer $(D)$(UNITDIR)/

# Packages per role into dist/: .deb (packaging/deb.sh) and .rpm (packaging/shifter.spec).
packages: deb rpm

deb:
	packaging/deb.sh "$(VERSION)" "$(SLURM_PREFIX)"

rpm:
	packaging/rpm.sh "$(VERSION)" "$(SLURM_PREFIX)"

demo: setup install
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

bench-launch: setup install
	$(PYTHON_SYS) bench/launch

bench-slurm: setup install
	$(PY) bench/slurm

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache dist build
