//! `mptcp-detour`: the client daemon (work in progress).

fn main() {}
