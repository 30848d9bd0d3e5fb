//! The contract between Muster's parts: the `muster.v1` wire protocol and the task spec.

#![forbid(unsafe_code)]

pub mod duration;
pub mod metrics;
pub mod spec;

/// Generated `muster.v1` messages and services.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("muster.v1");
}

/// Encoded descriptors of every `muster.v1` file, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/muster_descriptor.bin"));

/// Version string every binary reports.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
