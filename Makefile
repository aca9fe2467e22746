# consolegate — the two commands a newcomer needs: `make run` and `make test`.
# Both work on a fresh Debian 12 machine as root: they install what they need.

CARGO ?= cargo
RELEASE_BIN := target/release/consolegate

.PHONY: run test build release deps test-deps bench lint fmt clean fuzz fuzz-smoke fuzz-deps sim release-bin deb rpm package-test

build:
	$(CARGO) build --locked

release:
	$(CARGO) build --locked --release --workspace

# Build deps (Rust toolchain is expected; C toolchain for ring).
deps:
	@bash scripts/install-deps.sh build

# Peers the tests talk to: TigerVNC Xvnc, noVNC, Chromium, node modules for the browser test.
test-deps: deps
	@bash scripts/install-deps.sh test

# The appliance on its built-in default: until appliance mode exists this is
# `consolegate proxy` in front of a local Xvnc that the script starts itself.
run: deps release
	@bash scripts/run.sh

# The end-to-end tests run the debug binary built with fault injection
# (failpoints); shipped builds (make release, packages) never have it.
TEST_FEATURES := --features consolegate/failpoints

test: test-deps fuzz-deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --workspace --all-targets -- -D warnings
	$(CARGO) clippy --locked --workspace --all-targets $(TEST_FEATURES) -- -D warnings
	$(CARGO) build --locked --bins $(TEST_FEATURES)
	$(CARGO) test --locked --workspace $(TEST_FEATURES) -- --test-threads=2
	$(MAKE) --no-print-directory fuzz-smoke
	@if [ "$$(id -u)" = 0 ]; then $(MAKE) --no-print-directory package-test PACKAGE_TEST_PROFILE=dev; \
	else echo "package-test: not root, the install tests did not run (they need debootstrap, systemd-nspawn)"; fi

# Fuzzing with cargo-fuzz (libFuzzer, address sanitizer): fuzz/run.sh and
# docs/RELIABILITY.md. The fuzz crate is outside the workspace.
fuzz-deps: deps
	@bash scripts/install-deps.sh fuzz

# Every target briefly (FUZZ_SMOKE_RUNS executions or FUZZ_SMOKE_SECONDS
# seconds each, whichever first); any crash, leak, hang or memory blow-up fails.
fuzz-smoke: fuzz-deps
	$(CARGO) fmt --manifest-path fuzz/Cargo.toml -- --check
	@bash fuzz/run.sh smoke

# The long run: FUZZ_RUNS executions per target (default 10 000 000),
# FUZZ_JOBS targets at a time (default 1).
fuzz: fuzz-deps
	@bash fuzz/run.sh long

# The seeded simulation of the session state machine (docs/RELIABILITY.md,
# "Seeded simulation"): SIM_SEEDS seeds from SIM_FIRST_SEED on, stopping after
# SIM_MAX_SECONDS. SIM_SEED=N (or a comma-separated list) replays those seeds
# exactly, printing their step logs. The test build `make test` makes (debug
# assertions on: the session's check_invariants runs after every event).
SIM_SEEDS ?= 20000
SIM_FIRST_SEED ?= 0
SIM_MAX_SECONDS ?= 3600
SIM_SEED ?=
sim: deps
	CONSOLEGATE_SIM_RUNS=$(SIM_SEEDS) CONSOLEGATE_SIM_FIRST=$(SIM_FIRST_SEED) \
	CONSOLEGATE_SIM_SECONDS=$(SIM_MAX_SECONDS) CONSOLEGATE_SIM_SEED=$(SIM_SEED) \
	$(if $(SIM_SEED),CONSOLEGATE_SIM_VERBOSE=1) \
	$(CARGO) test --locked --lib dataplane::sim::tests::seeded -- --nocapture

# Packages (docs/PACKAGING.md): dpkg-buildpackage + debhelper, rpmbuild;
# both from the release binary, both linted (lintian, rpmlint). Output in
# target/packages/.
PACKAGES := target/packages

release-bin:
	$(CARGO) build --locked --release --bin consolegate

deb: release-bin
	@bash scripts/package.sh deb

rpm: release-bin
	@bash scripts/package.sh rpm

# The real install tests (root): the deb and rpm above plus a newer deb
# revision to upgrade to; the Debian 12 root is cached in
# /var/cache/consolegate-test (CONSOLEGATE_TEST_CACHE), outside the checkout.
# PACKAGE_TEST_PROFILE is the cargo profile of the binary packaged for the
# test: `release` (alone: what make deb ships) or `dev`, which `make test`
# uses: the shipped features (no failpoints) on the debug build `make test`
# made already, so a clean CI machine does not pay a release build from
# scratch (docs/PACKAGING.md, "Cost in CI"). The packaging is the same.
PACKAGE_TEST_PROFILE ?= release
PACKAGE_TEST_BIN = target/$(if $(filter dev,$(PACKAGE_TEST_PROFILE)),debug,$(PACKAGE_TEST_PROFILE))/consolegate
package-test: test-deps
	$(CARGO) build --locked --profile $(PACKAGE_TEST_PROFILE) --bin consolegate
	rm -rf $(PACKAGES)/test
	mkdir -p $(PACKAGES)/test
	cp $(PACKAGE_TEST_BIN) $(PACKAGES)/test/consolegate
	PKG_BINARY=$(PACKAGES)/test/consolegate PKG_OUT=$(PACKAGES)/test/old bash scripts/package.sh deb
	PKG_BINARY=$(PACKAGES)/test/consolegate PKG_OUT=$(PACKAGES)/test/new PKG_RELEASE=2 bash scripts/package.sh deb
	PKG_BINARY=$(PACKAGES)/test/consolegate PKG_OUT=$(PACKAGES)/test/old bash scripts/package.sh rpm
	PKG_BINARY=$(PACKAGES)/test/consolegate PKG_OUT=$(PACKAGES)/test/new PKG_RELEASE=2 bash scripts/package.sh rpm
	bash tests/packaging/install-test.sh $(PACKAGES)/test/old/*.deb $(PACKAGES)/test/new/*.deb \
		$(PACKAGES)/test/old/*.rpm $(PACKAGES)/test/new/*.rpm

bench: deps
	@bash scripts/bench.sh

# The soak (issue 8): the release appliance under steady relays plus session
# churn for SOAK_DURATION_S seconds (default 1 h); fails when descriptors or
# memory grow or unexpected errors happen. Results in target/soak/
# (soak.md, soak.json, soak.svg), or SOAK_OUT_DIR. SOAK_ARGS passes more
# options, e.g. SOAK_ARGS="--io epoll".
.PHONY: soak
SOAK_DURATION_S ?= 3600
SOAK_OUT_DIR ?= target/soak
SOAK_ARGS ?=
soak: deps
	$(CARGO) build --locked --release --workspace
	target/release/consolegate-bench soak --duration-s $(SOAK_DURATION_S) \
		--consolegate $(RELEASE_BIN) --out-dir $(SOAK_OUT_DIR) $(SOAK_ARGS)

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
