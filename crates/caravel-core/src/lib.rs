//! Domain types shared by every Caravel crate: ids, resources, tenants, quotas, jobs,
//! tasks, runs, nodes, usage records, pending reasons, the wire types of the HTTP API and
//! the stable error codes.
//!
//! This crate must not depend on any I/O, async runtime or clock: the pure scheduler and
//! the simulator build on it.

#![forbid(unsafe_code)]

pub mod api;
pub mod error;
pub mod isolation;
pub mod job;
pub mod node;
pub mod quantity;
pub mod resources;
pub mod service;
pub mod tenant;

pub use error::{ErrorCode, ValidationError};
pub use isolation::*;
pub use job::*;
pub use node::*;
pub use resources::*;
pub use service::*;
pub use tenant::*;

/// Milliseconds since the Unix epoch. Every timestamp in Caravel is one of these so that
/// metering is exact to the millisecond.
pub type Millis = i64;

macro_rules! id_type {
    ($name:ident, $prefix:literal) => {
        #[derive(
            Debug,
            Clone,
            Copy,
            PartialEq,
            Eq,
            PartialOrd,
            Ord,
            Hash,
            serde::Serialize,
            serde::Deserialize,
            utoipa::ToSchema,
        )]
        #[serde(transparent)]
        pub struct $name(pub u64);

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{}", self.0)
            }
        }

        impl $name {
            pub const PREFIX: &'static str = $prefix;
        }
    };
}

id_type!(JobId, "job");
id_type!(NodeId, "node");
id_type!(TenantId, "tenant");
id_type!(RunId, "run");
