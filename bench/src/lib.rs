//! Benchmarks of mptcp-proxy. The harness lands with issue 7; see `bench/README.md`.
