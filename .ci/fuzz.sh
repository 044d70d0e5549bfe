# Run by .ci/run: each fuzz target of fuzz/ for FUZZ_SECONDS (60 by default), starting from
# its committed corpus. A panic, a broken promise (the targets assert them), an allocation
# over 64 MB from an input of at most 4 KB, or a leak fails the step and leaves the input
# in fuzz/artifacts/<target>/.
#
# cargo fuzz needs nightly compiler flags (the sanitizer); the machine has one stable
# toolchain and can't fetch another, so RUSTC_BOOTSTRAP=1 lets stable accept them.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz"
  cargo install cargo-fuzz --locked --quiet
fi
export RUSTC_BOOTSTRAP=1
cargo fuzz build -O
log="$(mktemp)"
for target in $(cargo fuzz list); do
  echo "fuzzing $target for ${FUZZ_SECONDS:-60} s"
  if ! cargo fuzz run -O "$target" -- -max_total_time="${FUZZ_SECONDS:-60}" -max_len=4096 \
    -malloc_limit_mb=64 -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
    tail -n 80 "$log"
    echo "fuzz target $target failed"
    exit 1
  fi
  grep -E '^(Done|stat::peak_rss_mb|stat::new_units_added)' "$log" || true
done
rm -f "$log"
