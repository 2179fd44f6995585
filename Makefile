# labeld: `make run` sets up and runs the daemon on config/labeld.toml; `make test` sets up and runs
# every test. Set-up steps are idempotent and cached (downloads in ~/.cache/labeld, unpacked in .deps/).
# `make run` installs only what building and running need; `make test`, `make deb` and `make bench` add
# their own packages (scripts/setup-system.sh ROLE).

CARGO ?= cargo
CONFIG ?= config/labeld.toml
BIN := target/release/labeld
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
IMAGE := target/image/labeld-$(VERSION).docker.tar

.PHONY: run test bench deb image image-test setup deps libtorch model build golden clean-deps

run: setup build
	$(BIN) run --config $(CONFIG)

# The release build first: should a dev-dependency ever unify other features into a shared crate, both
# builds are then in target/ and a `make run` after `make test` still compiles nothing (today they agree).
test: setup
	scripts/setup-system.sh test
	scripts/setup-mlserver.sh
	$(CARGO) build --release
	$(CARGO) test --release --all-targets

setup: deps model

# labeld vs the Python reference and onnxruntime on the same files, ResNet-18 and EfficientNet-Lite0
# (see README "Speed"). A smoke run: make bench BENCH_ARGS=--quick
bench: setup build
	scripts/setup-system.sh bench
	scripts/setup-bench.sh
	/usr/bin/python3 benches/bench.py $(BENCH_ARGS)

# target/deb/labeld_<version>_amd64.deb: binary, private libtorch, model, unit, /etc/labeld/labeld.toml,
# man pages labeld(8) and labeld.toml(5), docs in /usr/share/doc/labeld.
deb: setup build
	scripts/setup-system.sh deb
	scripts/build-deb.sh

# target/image/labeld-<version>.docker.tar: a container image on no base image, a Debian 12 root from
# the Debian archive (mmdebstrap) with the .deb installed (built stripped), committed by buildah. As
# root. `podman load` or `docker load` it (docs/operations.md#containers).
image: setup build
	scripts/setup-system.sh image
	scripts/build-image.sh

# The image taken apart and run in a chroot as PID 1 of its own namespaces (tests/image.rs; `make test`
# leaves it out: building the image takes minutes). Builds the image first when it is older than what
# goes into it.
image-test: setup build
	scripts/setup-system.sh image
	$(MAKE) --no-print-directory $(IMAGE)
	$(CARGO) test --release --test image -- --include-ignored

$(IMAGE): $(BIN) models/default.pt config/labeld.toml scripts/packaged-config.py scripts/build-image.sh scripts/build-deb.sh $(wildcard scripts/image/* scripts/deb/* systemd/*)
	$(MAKE) --no-print-directory image

deps:
	scripts/setup-system.sh run
	scripts/setup-libtorch.sh
	scripts/setup-onnxruntime.sh

libtorch:
	scripts/setup-libtorch.sh

# models/default.pt (ResNet-18 with WEIGHTS=/path/resnet18-f37072fd.pth, else EfficientNet-Lite0), and
# the same network as models/<name>.onnx
model: deps
	WEIGHTS="$(WEIGHTS)" scripts/setup-model.sh

build: deps
	$(CARGO) build --release

# Regenerates tests/data/golden with torchvision (only needed when the test photos change).
golden: model
	PYTHONPATH=.deps/py /usr/bin/python3 scripts/make_golden.py --model models/default.pt

clean-deps:
	rm -rf .deps models/*.pt models/*.onnx
