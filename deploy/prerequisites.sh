#!/usr/bin/env bash
# Installs what building and testing mptcp-proxy needs on Debian/Ubuntu, skipping what is present.
# Usage: deploy/prerequisites.sh build|test
set -euo pipefail
need=${1:-build}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# Debian packages: build needs the C libraries behind nftnl; tests need real peers and tools.
packages=(build-essential pkg-config libnftnl-dev libmnl-dev)
if [ "$need" = test ]; then
  packages+=(iproute2 nftables mptcpd nginx-light curl tshark tcpdump iperf3 prometheus jq)
  # The cluster tests (issue 14): bird2 on the router and beside every instance; python3-yaml reads
  # the Kubernetes manifests.
  packages+=(bird2 python3-yaml)
fi
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# nginx-light and nginx both provide /usr/sbin/nginx.
if [ -x /usr/sbin/nginx ]; then
  kept=(); for p in "${missing[@]}"; do [ "$p" = nginx-light ] || kept+=("$p"); done; missing=("${kept[@]}")
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}" >&2
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi
# Installing nginx, prometheus or bird2 may start their services; the tests start their own instances.
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
  as_root systemctl stop nginx prometheus bird 2>/dev/null || true
fi

# Rust: the dependencies need a recent toolchain (rust-version in Cargo.toml); distribution cargo is
# often older, so rustup provides it when missing.
if ! command -v cargo >/dev/null 2>&1; then
  [ -x "$HOME/.cargo/bin/cargo" ] || {
    echo "installing the Rust toolchain with rustup" >&2
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal -c rustfmt,clippy >&2
  }
fi
