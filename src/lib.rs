//! windshift-runner: a crash-tolerant runner host for Windshift coding-agent runs.
//!
//! See ARCHITECTURE.md for the code map and the invariants each module keeps.

pub mod cache_root;
pub mod config;
pub mod control;
pub mod daemon;
pub mod demo;
pub mod doctor;
pub mod effects;
pub mod fsm;
pub mod fuzzing;
pub mod journal;
pub mod logging;
pub mod metrics;
pub mod protocol;
pub mod redact;
pub mod sim;
pub mod triage_cli;
