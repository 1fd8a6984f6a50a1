//! The runner daemon: start-up, recovery, the claim loop, heartbeats, drain.
pub mod systemd;
