//! The pure run state machine (no IO, no clock, no randomness).
//!
//! - [`plan`]: what a claimed job becomes (secrets split off).
//! - [`machine`]: states, events, effects, [`transition`].
//! - [`phase`]: the work in flight inside each state, and the accessors read from outside.
//! - [`stop`]: what a stop does in each phase (the one place that decides it).
//! - [`verdict`]: spec 6.5 / 5.4 / 4.9 verdict rules.
//! - [`recover`](mod@recover): the start-up recovery table.
//! - [`signals`]: the journal budget of agent output and the coalescing past it.
//! - [`names`]: the one container-name builder (the journal's and the engine's).
pub mod contract;
pub mod machine;
pub mod names;
pub mod phase;
pub mod plan;
pub mod recover;
pub mod signals;
pub mod stop;
pub mod verdict;

pub use contract::AgentSignal;
pub use machine::{
    apply, claim, describe_verdict, transition, AfterExit, AgentFacts, Checkout, CheckoutRepo,
    ContainerStarting, Effect, Event, EventKind, Finish, PrepareStarted, PushStarting, Rejected,
    RepoHead, ReportStarting, RunState, StateKind, StopReason, Transition,
};
pub use phase::Phase;
pub use plan::{RunPlan, RunSecrets};
pub use recover::{recover, ContainerObservation, Observations, RecoveryDecision};
pub use signals::{AgentBudget, SignalFold, AGENT_RECORD_BUDGET, MAX_COALESCED_RECORDS};
pub use verdict::{Status, Verdict, CANCELED_ERROR};
