//! The gRPC edges of the controller: the node session service and the operator API.

pub mod fleet;
pub mod node;
