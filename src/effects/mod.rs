//! Effect handlers: the work of a run that touches the outside world (git, containers,
//! the JSONL agent driver). They return outcomes; they never write the journal.
pub mod agent_driver;
pub mod clock;
pub mod container;
pub mod engine;
pub mod engine_api;
pub mod git;
pub mod mem_engine;
pub mod session;
