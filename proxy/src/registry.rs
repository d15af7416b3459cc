//! The table of open client connections, and the operator's live view of it (`/connections` on the
//! admin listener, `mptcp-proxy connections` on the command line): per connection its transport, why it
//! is not MPTCP, addresses, target, bytes each way and age, and its subflows now with their interface,
//! backup flag, RTT, bytes and throttle class. No proxy peer shows subflows; this answers "why only one
//! subflow?".

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};

use serde_json::{json, Value};

use crate::connection::ClientConnection;
use crate::metrics::InterfaceMap;
use crate::sockets::{subflow_flags, MPTCP_SUBFLOW_FLAG_BKUP_LOC, MPTCP_SUBFLOW_FLAG_BKUP_REM};

/// Every open client connection of a server, by id (in accept order).
#[derive(Debug, Default)]
pub struct ConnectionRegistry {
    next: AtomicU64,
    open: Mutex<BTreeMap<u64, Weak<ClientConnection>>>,
    changed: tokio::sync::Notify,
}

/// A connection's place in the registry; leaving it (on drop) removes the entry.
#[derive(Debug)]
pub struct Registration {
    registry: Arc<ConnectionRegistry>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry
            .open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
        self.registry.changed.notify_waiters();
    }
}

impl ConnectionRegistry {
    /// Adds a connection; it stays listed while the returned registration lives.
    pub fn insert(self: &Arc<Self>, connection: Weak<ClientConnection>) -> Registration {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, connection);
        Registration {
            registry: self.clone(),
            id,
        }
    }

    /// How many connections are open.
    pub fn len(&self) -> usize {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether no connection is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Resolves once no connection is open (the drain at shutdown).
    pub async fn wait_empty(&self) {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_empty() {
                return;
            }
            notified.await;
        }
    }

    /// The open connections with their ids.
    pub fn snapshot(&self) -> Vec<(u64, Arc<ClientConnection>)> {
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter_map(|(id, weak)| weak.upgrade().map(|c| (*id, c)))
            .collect()
    }

    /// The `/connections` document: every open connection and its subflows now.
    pub fn view(&self, interfaces: &InterfaceMap, classes: &SubflowClasses) -> Value {
        let connections: Vec<Value> = self
            .snapshot()
            .into_iter()
            .map(|(id, connection)| connection_view(id, &connection, interfaces, classes))
            .collect();
        json!({ "count": connections.len(), "connections": connections })
    }
}

/// The throttle class each subflow is in now, by (proxy address, client address); written by the
/// throttle owner task's hooks after every applied change.
#[derive(Debug, Default)]
pub struct SubflowClasses {
    classes: RwLock<HashMap<(SocketAddr, SocketAddr), String>>,
}

impl SubflowClasses {
    /// Replaces the whole table.
    pub fn replace(&self, classes: HashMap<(SocketAddr, SocketAddr), String>) {
        *self.classes.write().unwrap_or_else(|p| p.into_inner()) = classes;
    }

    /// Records the class of one subflow (`None`: it has none any more).
    pub fn set(&self, local: SocketAddr, remote: SocketAddr, class: Option<String>) {
        let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
        let key = (canonical(local), canonical(remote));
        let mut classes = self.classes.write().unwrap_or_else(|p| p.into_inner());
        match class {
            Some(class) => classes.insert(key, class),
            None => classes.remove(&key),
        };
    }

    /// The class of the subflow `local`↔`remote`, if the throttle placed it.
    pub fn class_of(&self, local: SocketAddr, remote: SocketAddr) -> Option<String> {
        let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
        self.classes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(canonical(local), canonical(remote)))
            .cloned()
    }
}

fn connection_view(
    id: u64,
    connection: &ClientConnection,
    interfaces: &InterfaceMap,
    classes: &SubflowClasses,
) -> Value {
    let (subflows, kernel_bytes) = connection.subflows_now();
    // The kernel counts every byte (tunnels included); the proxy's own counters cover what hyper moved.
    let (from_client, to_client) = kernel_bytes.unwrap_or((0, 0));
    let from_client = from_client.max(connection.bytes_in.load(Ordering::Relaxed));
    let to_client = to_client.max(connection.bytes_out.load(Ordering::Relaxed));
    let upstream = connection.upstream();
    let mptcp = connection.transport == crate::sockets::Transport::Mptcp;
    let subflows: Vec<Value> = subflows
        .iter()
        .map(|subflow| {
            let flags = if mptcp {
                subflow_flags(subflow.local, subflow.remote).ok().flatten()
            } else {
                None
            };
            json!({
                "id": subflow.id,
                "local": subflow.local.to_string(),
                "remote": subflow.remote.to_string(),
                "interface": interfaces.name_of(subflow.local.ip(), subflow.remote.ip()),
                "backup": flags.map(|f| f & (MPTCP_SUBFLOW_FLAG_BKUP_REM | MPTCP_SUBFLOW_FLAG_BKUP_LOC) != 0),
                "rtt_ms": f64::from(subflow.rtt_us) / 1000.0,
                "bytes_acked": subflow.bytes_acked,
                "bytes_received": subflow.bytes_received,
                "class": classes.class_of(subflow.local, subflow.remote),
            })
        })
        .collect();
    json!({
        "id": id,
        "transport": connection.transport.as_str(),
        "fallback_reason": connection.fallback_reason(),
        "client": connection.client.to_string(),
        "local": connection.local.to_string(),
        "target": upstream.as_ref().map(|u| u.target.clone()),
        "upstream": upstream.as_ref().map(|u| u.address.to_string()),
        "bytes_from_client": from_client,
        "bytes_to_client": to_client,
        "age_seconds": connection.accepted.elapsed().as_secs_f64(),
        "subflows": subflows,
    })
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Renders a `/connections` document as a table, one line per connection and an indented line per
/// subflow, the way `ss -M` lists MPTCP sockets, joined with what only the proxy knows.
pub fn render_table(view: &Value) -> String {
    let text = |v: &Value| v.as_str().map_or_else(|| "-".to_owned(), str::to_owned);
    let mut rows = vec![[
        "ID",
        "TRANSPORT",
        "CLIENT",
        "TARGET",
        "UPSTREAM",
        "AGE",
        "FROM-CLIENT",
        "TO-CLIENT",
    ]
    .map(str::to_owned)];
    let mut details: Vec<Vec<String>> = vec![Vec::new()];
    for connection in view["connections"].as_array().into_iter().flatten() {
        rows.push([
            connection["id"].to_string(),
            text(&connection["transport"]),
            text(&connection["client"]),
            text(&connection["target"]),
            text(&connection["upstream"]),
            format!("{:.1}s", connection["age_seconds"].as_f64().unwrap_or(0.0)),
            bytes(connection["bytes_from_client"].as_u64().unwrap_or(0)),
            bytes(connection["bytes_to_client"].as_u64().unwrap_or(0)),
        ]);
        let mut lines = Vec::new();
        if let Some(reason) = connection["fallback_reason"].as_str() {
            lines.push(format!("    not MPTCP: {reason}"));
        }
        for subflow in connection["subflows"].as_array().into_iter().flatten() {
            let backup = match subflow["backup"].as_bool() {
                Some(true) => "backup",
                Some(false) => "active",
                None => "backup ?",
            };
            lines.push(format!(
                "    subflow {} {} <-> {} dev {} {} rtt {:.2}ms sent {} received {} class {}",
                subflow["id"],
                text(&subflow["local"]),
                text(&subflow["remote"]),
                text(&subflow["interface"]),
                backup,
                subflow["rtt_ms"].as_f64().unwrap_or(0.0),
                bytes(subflow["bytes_acked"].as_u64().unwrap_or(0)),
                bytes(subflow["bytes_received"].as_u64().unwrap_or(0)),
                text(&subflow["class"]),
            ));
        }
        details.push(lines);
    }
    let widths: Vec<usize> = (0..8)
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for (row, lines) in rows.iter().zip(&details) {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
        for line in lines {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_lists_connections_and_their_subflows() {
        let view = json!({
            "count": 2,
            "connections": [{
                "id": 1, "transport": "mptcp", "fallback_reason": null,
                "client": "10.0.1.2:40000", "local": "10.0.1.1:3128",
                "target": "10.0.3.2:80", "upstream": "10.0.3.2:80",
                "bytes_from_client": 120, "bytes_to_client": 3 << 20, "age_seconds": 2.5,
                "subflows": [
                    {"id": 1, "local": "10.0.1.1:3128", "remote": "10.0.1.2:40000", "interface": "p1",
                     "backup": false, "rtt_ms": 0.5, "bytes_acked": 2 << 20, "bytes_received": 120,
                     "class": null},
                    {"id": 2, "local": "10.0.1.1:3128", "remote": "10.0.2.2:40001", "interface": "p2",
                     "backup": true, "rtt_ms": 1.25, "bytes_acked": 1 << 20, "bytes_received": 0,
                     "class": "slow"}
                ]
            }, {
                "id": 2, "transport": "fallback_tcp",
                "fallback_reason": "the client did not offer MPTCP (no MP_CAPABLE in its SYN)",
                "client": "10.0.1.2:40002", "local": "10.0.1.1:3128", "target": null, "upstream": null,
                "bytes_from_client": 0, "bytes_to_client": 0, "age_seconds": 0.1, "subflows": []
            }]
        });
        let table = render_table(&view);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("ID  TRANSPORT"), "{table}");
        assert!(
            lines[1].contains("mptcp") && lines[1].contains("3.0 MiB"),
            "{table}"
        );
        assert!(lines[2]
            .contains("subflow 1 10.0.1.1:3128 <-> 10.0.1.2:40000 dev p1 active rtt 0.50ms"));
        assert!(lines[3].contains("dev p2 backup rtt 1.25ms sent 1.0 MiB received 0 B class slow"));
        assert!(
            lines[4].starts_with("2 ") && lines[4].contains("fallback_tcp"),
            "{table}"
        );
        assert!(lines[5].contains("not MPTCP: the client did not offer MPTCP"));
    }

    #[tokio::test]
    async fn registrations_leave_on_drop_and_wake_the_drain() {
        let registry = Arc::new(ConnectionRegistry::default());
        let first = registry.insert(Weak::new());
        let second = registry.insert(Weak::new());
        assert_eq!(registry.len(), 2);
        // Entries whose connection is gone are not listed.
        assert!(registry.snapshot().is_empty());
        let waiter = {
            let registry = registry.clone();
            tokio::spawn(async move { registry.wait_empty().await })
        };
        drop(first);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(second);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("drained")
            .expect("task");
    }
}
