#!/usr/bin/env bash
# Installs what building, testing, benchmarking or running mptcp-proxy needs on Debian/Ubuntu, skipping what
# is present, then checks that every program of deploy/requirements.txt for those uses is there: a missing
# one stops the run at once, naming the package that provides it.
# Usage: deploy/prerequisites.sh [--check-only] USE...   (USE: build, test, bench, run; default build)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
requirements=$here/requirements.txt
check_only=false
uses=()
for arg in "$@"; do
  case $arg in
    --check-only) check_only=true ;;
    build|test|bench|run) uses+=("$arg") ;;
    *) echo "usage: $0 [--check-only] build|test|bench|run..." >&2; exit 2 ;;
  esac
done
[ ${#uses[@]} -gt 0 ] || uses=(build)
# Testing and benchmarking build the code first.
case " ${uses[*]} " in *" test "*|*" bench "*) [[ " ${uses[*]} " == *" build "* ]] || uses+=(build) ;; esac

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
export PATH="$HOME/.cargo/bin:$PATH:/usr/sbin:/sbin"

# The lines of requirements.txt for the uses asked for: "what package".
wanted() {
  local what package line_uses use u
  while read -r what package line_uses _; do
    case $what in ''|'#'*) continue ;; esac
    for u in ${line_uses//,/ }; do
      for use in "${uses[@]}"; do
        if [ "$u" = "$use" ]; then echo "$what $package"; continue 3; fi
      done
    done
  done <"$requirements"
}

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

if ! $check_only; then
  # Debian packages, each once; `a|b` is satisfied by either.
  missing=()
  while read -r _ package; do
    case $package in cargo:*) continue ;; esac
    found=false
    for alternative in ${package//|/ }; do installed "$alternative" && found=true; done
    $found && continue
    first=${package%%|*}
    [[ " ${missing[*]} " == *" $first "* ]] || missing+=("$first")
  done < <(wanted)
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}" >&2
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
    # Installing a server may start its service; the tests start their own instances.
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
      for service in nginx prometheus squid haproxy bird openvpn iperf3; do
        [[ " ${missing[*]} " == *" $service"* ]] && as_root systemctl stop "$service" 2>/dev/null || true
      done
    fi
  fi

  # Rust: the dependencies need a recent toolchain (rust-version in Cargo.toml); distribution cargo is
  # often older, so rustup provides it when missing.
  if ! command -v cargo >/dev/null 2>&1; then
    echo "installing the Rust toolchain with rustup" >&2
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal -c rustfmt,clippy >&2
  fi

  # Cargo-installed tools.
  while read -r what package; do
    case $package in cargo:*) ;; *) continue ;; esac
    command -v "$what" >/dev/null 2>&1 && continue
    echo "installing ${package#cargo:} with cargo install --locked" >&2
    cargo install --locked --quiet "${package#cargo:}" >&2
  done < <(wanted)
fi

# Check every program, library and module of these uses.
absent=()
while read -r what package; do
  case $what in
    pc:*) pkg-config --exists "${what#pc:}" 2>/dev/null && continue ;;
    # Debian packages install modules for the system Python, whatever python3 comes first on PATH.
    py:*) /usr/bin/python3 -c "import ${what#py:}" 2>/dev/null && continue ;;
    *) command -v "$what" >/dev/null 2>&1 && continue ;;
  esac
  absent+=("$what (package ${package%%|*})")
done < <(wanted)
command -v cargo >/dev/null 2>&1 || absent+=("cargo (rustup: https://rustup.rs)")
if [ ${#absent[@]} -gt 0 ]; then
  echo "missing for ${uses[*]}:" >&2
  printf '  %s\n' "${absent[@]}" >&2
  echo "install them (deploy/requirements.txt lists each program's package) and run again" >&2
  exit 1
fi
