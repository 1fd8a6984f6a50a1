//! The Windshift runner protocol client: credential lifecycle, event sender; the wire types
//! are re-exported as `wire` from [`crate::protocol`]. See docs/control-plane.md.
pub mod client;
pub mod credential;
pub mod events;
pub mod plane;
pub mod ratelimit;
pub mod wire;

pub use client::{
    validate_api_url, ApiUrl, AuthState, Client, ClientConfig, ControlError, Preflight,
    RetryPolicy, StatusError,
};
pub use credential::{obtain_credential, CredentialError, CredentialInputs, CredentialSource};
pub use events::{EventSender, EventSenderConfig, RunEvents};
pub use ratelimit::{RateLimit, RateLimiter};

/// Exit code for configuration errors (BSD `EX_CONFIG`): bad `WS_API_URL`, no token, an
/// unwritable credential file, a rejected registration token.
pub const EXIT_CONFIG: i32 = 78;

/// Exit code when the server rejects the credential at runtime (401, or 403 on claim or
/// heartbeat: instance revoked, pool disabled). BSD `EX_NOPERM`. The daemon stops claiming,
/// lets in-flight runs settle, then exits with it so supervisors do not restart-loop silently.
pub const EXIT_CREDENTIAL_REJECTED: i32 = 77;
