# Thin wrapper over meson: `make demo`, `make check`, `make bench`, `make soak`.
BUILD      ?= build
ASAN_BUILD ?= build-asan
FUZZ_BUILD ?= build-fuzz
TSAN_BUILD ?= build-tsan
NINJA      ?= ninja
# 1: `make check` also runs the unit and integration tests under
# ThreadSanitizer (tests/run-all.sh, VMIG_TSAN). `make tsan` runs only those.
VMIG_TSAN  ?= 1
export VMIG_TSAN
# meson takes NINJA from the environment as the path of ninja itself: a
# `make check NINJA="ninja -j2"` must not reach it there.
unexport NINJA

.PHONY: all deps build asan tsan-build tsan demo check bench soak fuzz-campaign clean format

all: build

deps:
	@scripts/install-deps.sh

$(BUILD)/build.ninja:
	meson setup $(BUILD) --buildtype=release -Db_ndebug=false

$(ASAN_BUILD)/build.ninja:
	meson setup $(ASAN_BUILD) --buildtype=debug -Db_sanitize=address,undefined -Db_lundef=false

# clang: gcc 12 refuses the atomic fences of lib/vhost under -fsanitize=thread
# (-Werror=tsan).
$(TSAN_BUILD)/build.ninja:
	CC=clang meson setup $(TSAN_BUILD) --buildtype=debug -Db_sanitize=thread -Db_lundef=false

build: deps $(BUILD)/build.ninja
	$(NINJA) -C $(BUILD)

asan: deps $(ASAN_BUILD)/build.ninja
	$(NINJA) -C $(ASAN_BUILD)

tsan-build: deps $(TSAN_BUILD)/build.ninja
	$(NINJA) -C $(TSAN_BUILD)

tsan: tsan-build
	@VMIG_TSAN=only tests/run-all.sh $(BUILD) $(ASAN_BUILD) $(FUZZ_BUILD) $(TSAN_BUILD)

demo: build
	@scripts/demo.sh $(BUILD)

check: build asan $(if $(filter 0,$(VMIG_TSAN)),,tsan-build)
	@VMIG_NINJA="$(NINJA)" tests/run-all.sh $(BUILD) $(ASAN_BUILD) $(FUZZ_BUILD) $(TSAN_BUILD)

bench: build
	@bench/run.sh $(BUILD)

# Fault injection: SOAK_FAULTS migrations (500), each broken once, bounded by
# SOAK_MINUTES (60); see docs/reliability.md.
soak: build
	@tests/soak/soak.py $(BUILD)

# Every libFuzzer target for FUZZ_SECONDS (1200) each, JOBS (1) at a time.
fuzz-campaign: deps
	@tests/fuzz/campaign.sh $${FUZZ_SECONDS:-1200}

format:
	clang-format -i $$(git ls-files '*.c' '*.h')

clean:
	rm -rf $(BUILD) $(ASAN_BUILD) $(FUZZ_BUILD) $(TSAN_BUILD)
