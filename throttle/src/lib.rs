//! Subflow throttling by operator policy for the MPTCP proxy.
//!
//! As soon as an MPTCP connection has enough active subflows (2 by default),
//! the proxy puts selected subflows into rate-limited HTB classes, so MPTCP's
//! coupled congestion control shifts data to the preferred paths (seed 002,
//! §2 and §3.4).
//!
//! Layers, from pure to kernel-facing:
//! - [`config`]: the `[throttle]` policy (TOML) and `--throttle IFACE=RATE[:CEIL]`.
//! - [`core`]: sans-IO [`ThrottleState`]: events in, [`Change`]s out.
//! - [`kernel`]: applies changes with tc (HTB, IFB) over rtnetlink and
//!   nftables (`inet mptcp_proxy`) through libnftnl.
//! - [`pm_events`]: the kernel's `mptcp_pm` event listener.
//! - [`driver`]: the tokio owner task, [`run`].
//! - [`metrics`]: rule-install latency histogram hook.
//! - [`userspace`]: per-client byte-rate limits for relays, without tc.
//!
//! See README.md for what is installed where.

pub mod config;
pub mod core;
pub mod driver;
pub mod event;
pub mod kernel;
pub mod metrics;
pub mod nft;
pub mod pm_events;
pub mod rate;
pub mod restore;
pub mod stats;
pub mod subscribers;
pub mod tc;
pub mod upload;
pub mod userspace;

pub use crate::config::{
    ClassConfig, ClassDirection, ClassScope, Direction, EventSource, MissingPrivileges,
    PolicyError, PolicyViolation, QuickThrottle, RuleConfig, SubflowMatch, SubflowRole,
    ThrottleConfig,
};
pub use crate::core::{
    Change, ClassId, DesiredState, LiveSubflow, ResyncReport, ThrottleState, ThrottleStats,
};
pub use crate::driver::{
    event_channel, policy_channel, run, run_with_hooks, run_with_policy_updates,
    spawn_kernel_events, spawn_kernel_events_with_buffer, spawn_kernel_events_with_options,
    start_event_source, EventReceiver, EventSender, KernelEventListener, PolicyReceiver,
    PolicySender, ResyncReason, RunSummary, StampedEvent, ThrottleError, ThrottleHooks,
};
pub use crate::event::{
    ConnectionSelector, ConnectionToken, Destination, FourTuple, InterfaceRef, SubflowEvent,
    SubflowInfo,
};
pub use crate::kernel::KernelError;
pub use crate::metrics::InstallLatencyHistogram;
pub use crate::rate::{Rate, Size};
pub use crate::userspace::ClientRateLimiter;
