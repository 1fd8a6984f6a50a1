//! A token bucket that paces every authenticated call of one runner instance to the server's
//! documented limit (spec 2.1: 20 requests/s, burst 100, per instance). Callers reserve a
//! slot and sleep until it is due, so concurrent callers queue fairly instead of racing into
//! 429s.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Rate and burst of a [`RateLimiter`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub per_sec: f64,
    pub burst: f64,
}

impl RateLimit {
    /// Upstream's per-instance limit.
    pub const UPSTREAM: RateLimit = RateLimit {
        per_sec: 20.0,
        burst: 100.0,
    };
}

impl Default for RateLimit {
    fn default() -> Self {
        Self::UPSTREAM
    }
}

#[derive(Debug)]
struct Bucket {
    /// May go negative: a negative balance is the queue of reservations not yet due.
    tokens: f64,
    last: Instant,
}

/// Shared by every call a [`crate::control::Client`] makes with the credential.
#[derive(Debug)]
pub struct RateLimiter {
    limit: RateLimit,
    bucket: Mutex<Bucket>,
}

impl RateLimiter {
    pub fn new(limit: RateLimit) -> Self {
        let limit = RateLimit {
            per_sec: if limit.per_sec > 0.0 {
                limit.per_sec
            } else {
                1.0
            },
            burst: limit.burst.max(1.0),
        };
        Self {
            limit,
            bucket: Mutex::new(Bucket {
                tokens: limit.burst,
                last: Instant::now(),
            }),
        }
    }

    /// How long the caller must wait before its reserved slot is due (zero: go now).
    pub fn reserve(&self) -> Duration {
        let mut b = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let elapsed = now.duration_since(b.last).as_secs_f64();
        b.last = now;
        b.tokens = (b.tokens + elapsed * self.limit.per_sec).min(self.limit.burst);
        b.tokens -= 1.0;
        if b.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-b.tokens / self.limit.per_sec)
        }
    }

    /// Waits for a slot.
    pub async fn acquire(&self) {
        let wait = self.reserve();
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_is_free_then_slots_are_spaced_by_the_rate() {
        let l = RateLimiter::new(RateLimit {
            per_sec: 10.0,
            burst: 3.0,
        });
        for _ in 0..3 {
            assert_eq!(l.reserve(), Duration::ZERO);
        }
        let fourth = l.reserve();
        let fifth = l.reserve();
        assert!(fourth > Duration::from_millis(50) && fourth <= Duration::from_millis(100));
        assert!(
            fifth > fourth + Duration::from_millis(50),
            "{fourth:?} {fifth:?}"
        );
    }
}
