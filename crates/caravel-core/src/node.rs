//! Nodes: a machine running an agent, with its capacity, topology and labels.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{Capacity, Millis, NodeId};

#[derive(
    Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    #[serde(default)]
    pub region: String,
    #[serde(default)]
    pub zone: String,
    #[serde(default)]
    pub rack: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    /// Heartbeating and accepting work.
    Ready,
    /// Missed heartbeats for longer than the lost timeout; its runs were marked lost.
    Lost,
    /// Its agent shut down cleanly (`caravel down`, SIGTERM): its runs were stopped and
    /// requeued. Ready again when the agent registers again.
    Down,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Ready => "ready",
            NodeState::Lost => "lost",
            NodeState::Down => "down",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Node {
    pub id: NodeId,
    pub name: String,
    /// Address other tasks use to reach this machine (MASTER_ADDR for gangs).
    pub address: String,
    /// Base URL of the agent's own HTTP endpoint (logs).
    pub agent_url: String,
    /// Secret the server presents to the agent's endpoint. Never shown by the API.
    pub agent_secret: String,
    /// The pinned certificate of an `https` agent endpoint (`RegisterRequest`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_cert_sha256: Option<String>,
    pub topology: Topology,
    pub labels: BTreeMap<String, String>,
    pub capacity: Capacity,
    pub state: NodeState,
    pub last_seen_ms: Millis,
    pub registered_ms: Millis,
    /// Random id of the agent process; a new one means the agent restarted.
    pub instance: String,
    /// Drained by an operator: no new work is placed here; running batch tasks finish,
    /// service replicas move elsewhere (a replacement is ready before each one leaves).
    #[serde(default)]
    pub drained: bool,
    /// What keeps the node's isolation below `restricted`, as its agent said.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub isolation_missing: Vec<String>,
}
