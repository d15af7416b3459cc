#!/usr/bin/env bash
# Runs the whole test suite: formatting, lints, unit, property and end-to-end tests. The end-to-end
# tests build network namespaces, so this needs root (it re-runs itself with sudo). Under CI=true an
# end-to-end test that cannot run fails instead of skipping.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  exec sudo --preserve-env=CI,PATH,CARGO_HOME,RUSTUP_HOME "$0" "$@"
fi
bash deploy/prerequisites.sh test
export PATH="$HOME/.cargo/bin:$PATH"
# Leftovers of an interrupted earlier run (namespaces are named mpx<pid>n<k>-*). Only those whose
# test process is gone: other test runs on this machine may be using theirs right now.
# The detour lab's are mpx<pid>d<k>-*, and may hold OpenVPN or delay-line processes.
# The throttle crate's own tests name theirs mpthr-<tag>-<pid>-<k>.
for ns in $(ip netns list | awk '/^mpx[0-9]+[nd][0-9]+-/ || /^mpthr-[a-z0-9]+-[0-9]+-[0-9]+/ {print $1}'); do
  case $ns in
    mpx*) pid=${ns#mpx}; pid=${pid%%[nd]*} ;;
    *) pid=$(echo "$ns" | awk -F- '{print $(NF-1)}') ;;
  esac
  [ -d "/proc/$pid" ] && continue
  for p in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
  ip netns del "$ns" 2>/dev/null || true
done

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo test"
# --no-fail-fast: one failing binary must not hide how the others fared.
cargo test --workspace --all-targets --no-fail-fast "$@"
echo "== the Debian package: build, dpkg-deb, lintian, systemd-analyze, install, run, purge"
bash deploy/debian/package-test.sh
