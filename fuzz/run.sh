#!/usr/bin/env bash
# Runs tenso's coverage-guided fuzz targets (libFuzzer through cargo-fuzz, on the stable
# toolchain): fuzz/run.sh TARGET|all [SECONDS]   (default 60 s per target)
#
# Targets run one at a time, each for SECONDS, on one core. The corpus grows in
# fuzz/corpus/TARGET (seeded from fuzz/seeds/TARGET, tests/golden for dsn_parse and the
# sample config for config); a crash or an assertion failure leaves its input in
# fuzz/artifacts/TARGET/ (fuzzing goes on) and is reported at the end; logs go to
# fuzz/logs/. Reproduce one with `cargo fuzz run --fuzz-dir fuzz -O -s none TARGET FILE`.
#
# Installs cargo-fuzz when missing. Builds with `-O` (see fuzz/Cargo.toml: overflow
# checks on, debug assertions off) and no sanitizer (`-s none`): sanitizers need
# nightly rustc, and tenso's parsers are safe Rust, where the fuzzer's value is in
# panics and in the invariants each target asserts.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
cd "$root"

usage() { echo "usage: fuzz/run.sh TARGET|all [SECONDS]" >&2; exit 2; }
[ $# -ge 1 ] || usage
which="$1"
secs="${2:-60}"
[[ "$secs" =~ ^[0-9]+$ ]] || usage

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz (crates.io)"
  cargo install --locked cargo-fuzz --version 0.13.2
fi

fuzz() { cargo fuzz "$1" --fuzz-dir fuzz "${@:2}"; }

if [ "$which" = all ]; then
  mapfile -t targets < <(fuzz list)
else
  targets=("$which")
fi

seed() {
  local t="$1" dir="fuzz/corpus/$1"
  mkdir -p "$dir"
  if [ -d "fuzz/seeds/$t" ]; then cp -n fuzz/seeds/"$t"/* "$dir"/; fi
  case "$t" in
    dsn_parse) cp -n tests/golden/*.eml "$dir"/ ;;
    config) cp -n deploy/tenso.toml "$dir"/ ;;
  esac
}

mkdir -p fuzz/logs
summary=()
status=0
for t in "${targets[@]}"; do
  seed "$t"
  mkdir -p "fuzz/artifacts/$t"
  before=$(find "fuzz/artifacts/$t" -type f | wc -l)
  echo "== $t: ${secs}s"
  log="fuzz/logs/$t.log"
  rc=0
  # Fork mode with -ignore_crashes: a failing input is saved and fuzzing goes on, so
  # one run reports every distinct finding, not only the first.
  fuzz run -O -s none "$t" "fuzz/corpus/$t" -- -max_total_time="$secs" -timeout=10 \
    -fork=1 -ignore_crashes=1 -ignore_timeouts=1 -ignore_ooms=1 >"$log" 2>&1 || rc=$?
  last=$(grep -E '^#[0-9]+: cov:' "$log" | tail -1 || true)
  runs=$(sed -nE 's/^#([0-9]+): .*/\1/p' <<<"$last")
  cov=$(grep -oE 'cov: [0-9]+' <<<"$last" || true)
  fails=$(grep -oE 'oom/timeout/crash: [0-9/]+' <<<"$last" || true)
  new=$(( $(find "fuzz/artifacts/$t" -type f | wc -l) - before ))
  corpus=$(find "fuzz/corpus/$t" -type f | wc -l)
  if [ "$new" -eq 0 ] && [ "$rc" -eq 0 ]; then
    verdict="no finding"
  else
    status=1
    verdict="FINDINGS: $new new input(s) in fuzz/artifacts/$t (exit $rc)"
  fi
  summary+=("$t: ${runs:-?} executions in ${secs}s, ${cov:-cov: ?}, corpus $corpus, ${fails:-?}, $verdict")
  echo "   ${summary[-1]}"
done
echo
echo "== summary"
printf '%s\n' "${summary[@]}"
exit "$status"
