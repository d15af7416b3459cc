#!/usr/bin/env bash
# Runs the cargo-fuzz targets of every crate for a given time each; not part of CI.
#
#   deploy/fuzz.sh list                      every target, as CRATE_DIR/TARGET
#   deploy/fuzz.sh TARGET|CRATE_DIR/TARGET|all SECONDS
#
# Targets are found in every */fuzz/Cargo.toml (and */*/fuzz/Cargo.toml), so a crate that adds a fuzz
# crate or a [[bin]] is picked up without editing this script. Each run starts from the checked-in
# corpus (CRATE/fuzz/corpus/TARGET, replayed by that crate's `cargo test`), writes new inputs to the
# ignored CRATE/fuzz/work/TARGET, and at the end merges into the checked-in corpus only the inputs that
# add a coverage edge (libFuzzer -merge=1 -use_counters=0), so it stays small. Crashes land in CRATE/fuzz/artifacts/TARGET.
# It prints one Markdown row per target: | target | seconds | executions | exec/s | crashes | corpus |,
# and appends it to target/fuzz-results.md.
#
# cargo-fuzz needs nightly features: on a stable toolchain RUSTC_BOOTSTRAP=1 enables them
# (`cargo install cargo-fuzz --locked` once). Targets are built without a sanitizer (the parsers are
# safe Rust; debug assertions and overflow checks stay on), which runs several times faster.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
export RUSTC_BOOTSTRAP=1
export PATH="$HOME/.cargo/bin:$PATH"

targets() {
  local manifest dir
  for manifest in */fuzz/Cargo.toml */*/fuzz/Cargo.toml; do
    [ -f "$manifest" ] || continue
    dir=$(dirname "$(dirname "$manifest")")
    case "$dir" in target*|*/target*) continue ;; esac
    # Every [[bin]] name of the fuzz crate.
    awk '/^\[\[bin\]\]/ {bin=1; next} /^\[/ {bin=0} bin && /^name *=/ {gsub(/.*= *"|".*/, ""); print}' "$manifest" |
      while read -r name; do echo "$dir/$name"; done
  done
}

run_one() { # CRATE_DIR/TARGET SECONDS
  local dir=${1%/*} name=${1##*/} seconds=$2
  local fuzz="$root/$dir/fuzz" log
  mkdir -p "$fuzz/corpus/$name" "$fuzz/work/$name" "$fuzz/artifacts/$name"
  log="$fuzz/work/$name.log"
  (cd "$dir" && cargo fuzz build -s none "$name") >&2
  local status=0
  (cd "$dir" && cargo fuzz run -s none "$name" "$fuzz/work/$name" "$fuzz/corpus/$name" -- \
      -max_total_time="$seconds" -print_final_stats=1 \
      -artifact_prefix="$fuzz/artifacts/$name/" -close_fd_mask=3) >"$log" 2>&1 || status=$?
  local execs
  execs=$(awk '/stat::number_of_executed_units/ {s += $NF} END {print s + 0}' "$log")
  local crashes
  crashes=$(find "$fuzz/artifacts/$name" -type f | wc -l)
  (cd "$dir" && cargo fuzz run -s none "$name" -- -merge=1 -use_counters=0 "$fuzz/corpus/$name" "$fuzz/work/$name") \
    >"$fuzz/work/$name.merge.log" 2>&1 || true
  local corpus
  corpus=$(find "$fuzz/corpus/$name" -type f | wc -l)
  local row="| $dir/$name | $seconds | $execs | $((execs / (seconds > 0 ? seconds : 1))) | $crashes | $corpus |"
  echo "$row"
  mkdir -p target
  echo "$(date -u +%F) $row" >>target/fuzz-results.md
  [ "$status" = 0 ] || [ "$crashes" != 0 ] || echo "$1: libFuzzer exited $status (see $log)" >&2
}

case "${1:-}" in
  list) targets ;;
  "" | -h | --help) sed -n '2,8p' "$0"; exit 2 ;;
  *)
    seconds=${2:?SECONDS}
    if [ "$1" = all ]; then selected=$(targets); else
      selected=$(targets | awk -v t="$1" '$0 == t || substr($0, length($0) - length(t)) == "/" t')
      [ -n "$selected" ] || { echo "no fuzz target $1 (see: $0 list)" >&2; exit 2; }
    fi
    echo "| target | seconds | executions | exec/s | crashes | corpus files |"
    echo "|---|---|---|---|---|---|"
    for t in $selected; do run_one "$t" "$seconds"; done
    ;;
esac
