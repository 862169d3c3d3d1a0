# Thin wrapper over meson: `make demo`, `make check`, `make bench`.
BUILD      ?= build
ASAN_BUILD ?= build-asan
FUZZ_BUILD ?= build-fuzz
NINJA      ?= ninja
# meson takes NINJA from the environment as the path of ninja itself: a
# `make check NINJA="ninja -j2"` must not reach it there.
unexport NINJA

.PHONY: all deps build asan demo check bench clean format

all: build

deps:
	@scripts/install-deps.sh

$(BUILD)/build.ninja:
	meson setup $(BUILD) --buildtype=release -Db_ndebug=false

$(ASAN_BUILD)/build.ninja:
	meson setup $(ASAN_BUILD) --buildtype=debug -Db_sanitize=address,undefined -Db_lundef=false

build: deps $(BUILD)/build.ninja
	$(NINJA) -C $(BUILD)

asan: deps $(ASAN_BUILD)/build.ninja
	$(NINJA) -C $(ASAN_BUILD)

demo: build
	@scripts/demo.sh $(BUILD)

check: build asan
	@VMIG_NINJA="$(NINJA)" tests/run-all.sh $(BUILD) $(ASAN_BUILD) $(FUZZ_BUILD)

bench: build
	@bench/run.sh $(BUILD)

format:
	clang-format -i $$(git ls-files '*.c' '*.h')

clean:
	rm -rf $(BUILD) $(ASAN_BUILD) $(FUZZ_BUILD)
