//! The protocol's JSON bodies, re-exported from [`crate::protocol`] where they live: the
//! client and the state machine both use them, so they are not the client's.
pub use crate::protocol::*;
