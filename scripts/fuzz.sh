#!/usr/bin/env bash
# Fuzz shamal-tensor (the KServe v2 tensor codec) and shamal-auth's bearer
# token parsing with cargo-fuzz/libFuzzer.
#
#   scripts/fuzz.sh [SECONDS]     # SECONDS per target, default 60
#
# Runs every target of fuzz/Cargo.toml in turn (FUZZ_TARGETS="a b" to choose),
# starting from fuzz/seeds/<target> and the growing, gitignored corpus
# fuzz/corpus/<target>. Crashing inputs go to fuzz/artifacts/<target>/, logs to
# fuzz/artifacts/logs/<target>.log. Exits non-zero if any target crashed.
#
# Only the stable toolchain is needed: RUSTC_BOOTSTRAP=1 lets it accept the -Z
# flags cargo-fuzz passes. FUZZ_SANITIZER=none skips AddressSanitizer (faster;
# the targets are safe Rust, panics and OOMs are caught either way).
set -euo pipefail

duration="${1:-60}"
if ! [[ "$duration" =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: $0 [SECONDS]   (SECONDS per target, a positive integer; default 60)" >&2
    exit 2
fi
sanitizer="${FUZZ_SANITIZER:-address}"

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "==> cargo-fuzz not found; installing it (cargo install cargo-fuzz --locked, ~2-5 min)"
    cargo install cargo-fuzz --locked
fi
echo "==> $(cargo fuzz --version)"

export RUSTC_BOOTSTRAP=1

# -a: debug assertions and overflow checks on, so arithmetic overflow panics.
fuzz_flags=(--debug-assertions --sanitizer "$sanitizer")
# Each sanitizer gets its own build directory, so that switching between them
# does not rebuild every dependency.
if [[ "$sanitizer" != address ]]; then
    fuzz_flags+=(--target-dir "fuzz/target/sanitizer-$sanitizer")
fi

if [[ -n "${FUZZ_TARGETS:-}" ]]; then
    read -r -a targets <<<"$FUZZ_TARGETS"
else
    mapfile -t targets < <(cargo fuzz list)
fi
if [[ ${#targets[@]} -eq 0 ]]; then
    echo "error: no fuzz targets found under fuzz/" >&2
    exit 1
fi

echo "==> building ${targets[*]} (sanitizer: $sanitizer; first build takes several minutes)"
for target in "${targets[@]}"; do
    cargo fuzz build "${fuzz_flags[@]}" "$target"
done

mkdir -p fuzz/artifacts/logs
failed=()
for target in "${targets[@]}"; do
    corpus_dirs=("fuzz/corpus/$target")
    mkdir -p "fuzz/corpus/$target"
    if [[ -d "fuzz/seeds/$target" ]]; then
        corpus_dirs+=("fuzz/seeds/$target")
    fi
    log="fuzz/artifacts/logs/$target.log"
    echo "==> fuzzing $target for ${duration}s (corpus: ${corpus_dirs[*]}; log: $log)"
    if cargo fuzz run "${fuzz_flags[@]}" "$target" "${corpus_dirs[@]}" -- \
        -max_total_time="$duration" -timeout=10 -print_final_stats=1 >"$log" 2>&1; then
        summary="$(grep -E '^(#[0-9]+[[:space:]]+DONE|Done [0-9]+ runs|stat::number_of_executed_units)' "$log" | tr '\n' ' ' || true)"
        echo "    ok: $target: ${summary:-see $log}"
    else
        echo "    CRASH: $target (see $log; inputs under fuzz/artifacts/$target/):" >&2
        grep -E -A4 "panicked at|ERROR: (libFuzzer|AddressSanitizer)|SUMMARY:" "$log" | head -n 20 >&2 || true
        failed+=("$target")
    fi
done

if [[ ${#failed[@]} -gt 0 ]]; then
    echo "==> FAILED: crash in ${failed[*]}" >&2
    exit 1
fi
echo "==> all targets ran ${duration}s without a crash"
