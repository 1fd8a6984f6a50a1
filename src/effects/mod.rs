//! Effect handlers: the work of a run that touches the outside world.
pub mod agent_driver;
pub mod container;
