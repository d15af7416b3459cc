#!/usr/bin/env bash
# Builds and runs mptcp-proxy on its embedded default configuration (a forward proxy on 0.0.0.0:3128).
# Extra arguments go to the proxy, e.g. --listen 10.0.0.1:3128 or --config FILE.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/prerequisites.sh build run
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release -p mptcp-proxy --bin mptcp-proxy
exec target/release/mptcp-proxy "$@"
