#!/usr/bin/env bash
# Builds target/debian/mptcp-proxy_<version>_amd64.deb: the five binaries, their --help texts, the commented
# example configurations (conffiles under /etc/mptcp-proxy/), systemd units, logrotate, maintainer scripts.
# Packaging metadata: [package.metadata.deb] in proxy/Cargo.toml. Prints the package's path.
# Usage: deploy/debian/build-deb.sh   (installs cargo-deb and the build packages first when missing)
set -euo pipefail
cd "$(dirname "$0")/../.."
bash deploy/prerequisites.sh build >&2
export PATH="$HOME/.cargo/bin:$PATH"
command -v cargo-deb >/dev/null || cargo install --locked --quiet cargo-deb >&2
target=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')

cargo build --release --locked -p mptcp-proxy -p mptcp-sniffer -p mpip-proxy -p mptcp-detour --bins >&2

# Generated assets: the help texts, and the default configuration with the packaged access-log path.
generated=$target/release/debian
rm -rf "$generated"; mkdir -p "$generated/help"
for binary in mptcp-proxy mptcp-convert mptcp-sniffer mpip-proxy mpipd mptcp-detourd mptcp-detour; do
  "$target/release/$binary" --help >"$generated/help/$binary.txt"
done
"$target/release/mptcp-proxy" connections --help >"$generated/help/mptcp-proxy-connections.txt"
{
  echo "# mptcp-proxy's configuration (installed by the Debian package; every key and default is"
  echo "# explained in /usr/share/doc/mptcp-proxy/README.gz). \`systemctl reload mptcp-proxy\` applies"
  echo "# changes without dropping transfers; a file with an error is refused and the running one stays."
  echo
  sed 's|^path = "-"$|path = "/var/log/mptcp-proxy/access.log"|' proxy/src/default.toml
} >"$generated/mptcp-proxy.toml"
grep -q '^path = "/var/log/mptcp-proxy/access.log"$' "$generated/mptcp-proxy.toml" || {
  echo "build-deb.sh: proxy/src/default.toml has no [access_log] path = \"-\" line to replace" >&2
  exit 1
}
"$target/release/mptcp-proxy" --config "$generated/mptcp-proxy.toml" --check-config >&2

cargo deb -p mptcp-proxy --no-build --strip --output "$target/debian/" >&2
version=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"name":"mptcp-proxy","version":"\([^"]*\)".*/\1/p')
ls "$target/debian/mptcp-proxy_${version}"*_amd64.deb | tail -1
