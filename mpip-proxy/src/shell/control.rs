//! Live routing: the admin endpoints that show and switch the routing
//! profile (`[routing.profile.NAME]`) of a running end.
//!
//! - `GET /mpip/routing`: the profile in force and every profile's name.
//! - `POST /mpip/routing/profile/NAME`: makes NAME the profile in force on
//!   every shard; existing sessions follow from their next packet (rules are
//!   looked up per packet), and nothing queued is dropped.
//!
//! They are served on the admin listener (loopback by default: whoever can
//! reach it can also read `/metrics`; keep it so).

use std::sync::{Arc, Mutex};

use http::{Method, StatusCode};

use super::supervisor::RoutingSender;
use crate::config::RoutingConfig;

/// The profiles and the one in force; the admin extension of both ends.
#[derive(Debug)]
pub struct RoutingControl {
    state: Mutex<State>,
    sender: RoutingSender,
}

#[derive(Debug)]
struct State {
    profiles: RoutingConfig,
    active: String,
}

impl RoutingControl {
    /// Control of `profiles`, starting with their `active` one.
    pub fn new(profiles: RoutingConfig, sender: RoutingSender) -> Arc<Self> {
        Arc::new(RoutingControl {
            state: Mutex::new(State {
                active: profiles.active_name().to_owned(),
                profiles,
            }),
            sender,
        })
    }

    /// After a reload: the file's profiles, and its `active` one in force
    /// (the shards got that table with the reload).
    pub fn reloaded(&self, profiles: RoutingConfig) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.active = profiles.active_name().to_owned();
        state.profiles = profiles;
    }

    /// Makes profile `name` the one in force; `false` if there is none.
    pub fn switch(&self, name: &str) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let Some(table) = state.profiles.profile(name) else {
            return false;
        };
        self.sender.switch(&table);
        state.active = name.to_owned();
        tracing::info!(
            profile = name,
            rules = table.rules.len(),
            "routing profile switched"
        );
        true
    }

    /// The profile in force.
    pub fn active(&self) -> String {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .active
            .clone()
    }

    fn describe(&self) -> String {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let profiles: Vec<String> = state
            .profiles
            .names()
            .iter()
            .map(|n| format!("\"{}\"", escape(n)))
            .collect();
        format!(
            "{{\"active\":\"{}\",\"profiles\":[{}]}}\n",
            escape(&state.active),
            profiles.join(",")
        )
    }
}

fn escape(text: &str) -> String {
    text.chars()
        .flat_map(|c| match c {
            '"' => vec!['\\', '"'],
            '\\' => vec!['\\', '\\'],
            c if c.is_control() => vec![],
            c => vec![c],
        })
        .collect()
}

impl mptcp_proxy::admin::AdminExtension for RoutingControl {
    fn answer(&self, method: &Method, path: &str) -> Option<(StatusCode, &'static str, String)> {
        match (method, path) {
            (&Method::GET, "/mpip/routing") => {
                Some((StatusCode::OK, "application/json", self.describe()))
            }
            (&Method::POST, path) => {
                let name = path.strip_prefix("/mpip/routing/profile/")?;
                if self.switch(name) {
                    Some((StatusCode::OK, "application/json", self.describe()))
                } else {
                    Some((
                        StatusCode::NOT_FOUND,
                        "text/plain",
                        format!("no routing profile {name:?}\n"),
                    ))
                }
            }
            (_, path) if path.starts_with("/mpip/routing") => Some((
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "GET /mpip/routing, POST /mpip/routing/profile/NAME\n".to_owned(),
            )),
            _ => None,
        }
    }
}
