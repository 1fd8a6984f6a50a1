//! The pure run state machine (no IO, no clock, no randomness).
pub mod contract;
