# Shell helpers for the testbed's user-space delay line (`testbed-delay`), sourced by testbed.sh and
# detour.sh. The caller defines `die` and `delay_dir` (where the lines' logs go).

delay_binary() {
  if [ -n "${TESTBED_DELAY:-}" ]; then echo "$TESTBED_DELAY"; return; fi
  local root target newest="" candidate
  root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
  target=${CARGO_TARGET_DIR:-$root/target}
  case "$target" in /*) ;; *) target="$root/$target" ;; esac
  for candidate in "$target/release/testbed-delay" "$target/debug/testbed-delay"; do
    if [ -x "$candidate" ] && { [ -z "$newest" ] || [ "$candidate" -nt "$newest" ]; }; then newest=$candidate; fi
  done
  if [ -n "$newest" ]; then echo "$newest"; return; fi
  command -v testbed-delay || die "testbed-delay not found: cargo build -p testbed --bin testbed-delay, or set TESTBED_DELAY"
}

start_delay() { # ns dev egress|ingress DELAY [options...]
  local ns=$1 dev=$2 direction=$3 delay=$4 bin log i
  shift 4
  case "$direction" in egress|ingress) ;; *) die "direction must be egress or ingress, not $direction" ;; esac
  bin=$(delay_binary)
  mkdir -p "$delay_dir"
  log="$delay_dir/$ns-$dev-$direction.log"
  # Detached, so a caller that captures our output does not wait for the line to end.
  setsid ip netns exec "$ns" "$bin" --dev "$dev" "--$direction" --delay "$delay" "$@" </dev/null >"$log" 2>&1 &
  for i in $(seq 100); do
    if grep -q '^ready' "$log" 2>/dev/null; then echo "$log"; return; fi
    if ! kill -0 $! 2>/dev/null; then die "delay line on $ns $dev failed: $(cat "$log")"; fi
    sleep 0.05
  done
  die "delay line on $ns $dev not ready after 5 s: $(cat "$log")"
}

