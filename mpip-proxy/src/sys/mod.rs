//! Operating-system side of the MPIP shell: TUN devices, interface scanning,
//! path sockets, the BPF programs that steer traffic to the proxy end's
//! shards, and the gateway's nftables masquerade. Everything here talks to
//! the kernel; the protocol state lives in the sans-IO modules.

pub mod bpf;
mod ifreq;
pub mod nat;
pub mod netif;
pub mod route;
pub mod socket;
#[cfg(test)]
mod testns;
pub mod tun;
