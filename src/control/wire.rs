//! The protocol's JSON bodies, re-exported from [`crate::protocol`] where they live: the
//! client, the devserver and the state machine all speak them, so they are not the client's.
pub use crate::protocol::*;
