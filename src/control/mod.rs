//! The Windshift runner protocol: wire types, client, credential lifecycle, event sender.
pub mod wire;
