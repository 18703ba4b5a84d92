#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for a while; CI does not run this.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     (default: 30, all targets)
#
# Installs cargo-fuzz (`cargo install cargo-fuzz --locked`) when missing.
# cargo-fuzz passes nightly-only flags (-Z sanitizer, -Cpasses=sancov); on a
# stable toolchain RUSTC_BOOTSTRAP=1 lets them through. The AddressSanitizer
# runtime ships with the x86_64 Linux stable toolchain; set FUZZ_SANITIZER=none
# where it does not. Findings land in fuzz/artifacts/<target>/, the growing
# corpus in fuzz/corpus/<target>/ (both ignored by git). Exits non-zero when
# a target crashed.
set -euo pipefail

seconds="${1:-30}"
shift || true
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root/fuzz"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi

if ! rustc --version | grep -q nightly; then
    export RUSTC_BOOTSTRAP=1
fi

targets=("$@")
if [ "${#targets[@]}" -eq 0 ]; then
    mapfile -t targets < <(cargo fuzz list)
fi

sanitizer="${FUZZ_SANITIZER:-address}"
failed=()
for t in "${targets[@]}"; do
    echo "fuzz.sh: $t for ${seconds}s (sanitizer: $sanitizer)" >&2
    mkdir -p "corpus/$t"
    # -rss_limit_mb: a config naming a huge file must not look like a leak;
    # -max_len keeps inputs small enough to be meaningful for these parsers.
    if ! cargo fuzz run --sanitizer "$sanitizer" "$t" "corpus/$t" -- \
        -max_total_time="$seconds" -max_len=4096 -rss_limit_mb=2048 \
        -print_final_stats=1; then
        failed+=("$t")
    fi
done

if [ "${#failed[@]}" -gt 0 ]; then
    echo "fuzz.sh: crashes in: ${failed[*]} (see fuzz/artifacts/)" >&2
    exit 1
fi
echo "fuzz.sh: ${#targets[@]} targets ran ${seconds}s each without a crash" >&2
