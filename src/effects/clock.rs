//! The clock as the daemon's loops use it: the wall-clock time records carry and the run's
//! time limit counts from, and a sleep. Behind a trait (`Ctx::clock`) so a test or a
//! simulation can run on its own time; [`SystemClock`] is the real one.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

pub trait Clock: Send + Sync {
    /// Unix milliseconds.
    fn now_ms(&self) -> i64;
    /// Completes once `duration` has passed.
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Future<Output = ()> + Send>>;
}

/// The system clock and tokio's timer.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        crate::journal::now_ms()
    }

    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(tokio::time::sleep(duration))
    }
}
