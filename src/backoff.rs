//! Waiting longer after each failure: `first`, doubling up to `max`, back to `first` after a success.
//! A decision, not a clock: the caller says what time it is. `jittered` spreads a wait for retries
//! that must not run in step with another box's.

use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    /// The wait after the last failure (None: no failure since the last success).
    delay: Option<Duration>,
    /// When the next try is due.
    next: Option<Instant>,
}

impl Backoff {
    pub const fn new(first: Duration, max: Duration) -> Backoff {
        Backoff { first, max, delay: None, next: None }
    }

    /// The wait after the `tries`-th failure in a row (1: `first`).
    pub fn delay_after(&self, tries: u32) -> Duration {
        self.first.saturating_mul(1 << tries.saturating_sub(1).min(20)).min(self.max)
    }

    /// A try failed at `now`: the next one is due after a longer wait, which is returned.
    pub fn failed(&mut self, now: Instant) -> Duration {
        let d = self.delay.map_or(self.first, |d| d.saturating_mul(2).min(self.max));
        self.delay = Some(d);
        self.next = Some(now + d);
        d
    }

    pub fn succeeded(&mut self) {
        self.delay = None;
        self.next = None;
    }

    /// Whether a try may run at `now`.
    pub fn due(&self, now: Instant) -> bool {
        self.next.is_none_or(|t| now >= t)
    }

    /// When the next try is due, if one is waiting.
    pub fn next(&self) -> Option<Instant> {
        self.next
    }
}

/// `d` times a random factor in [0.5, 1.5): boxes (or two clients with one id) do not retry in step.
pub fn jittered(d: Duration) -> Duration {
    let mut seed = [0u8; 8];
    let _ = rustix::rand::getrandom(&mut seed, rustix::rand::GetRandomFlags::empty());
    let unit = (u64::from_le_bytes(seed) >> 11) as f64 / (1u64 << 53) as f64;
    d.mul_f64(0.5 + unit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_up_to_the_maximum_and_a_success_starts_over() {
        let t0 = Instant::now();
        let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        assert!(b.due(t0));
        let waits: Vec<u64> = (0..9).map(|_| b.failed(t0).as_millis() as u64).collect();
        assert_eq!(waits, [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]);
        assert!(!b.due(t0) && b.due(t0 + Duration::from_secs(30)));
        b.succeeded();
        assert_eq!((b.due(t0), b.next()), (true, None));
        assert_eq!(b.failed(t0), Duration::from_millis(500));
        assert_eq!(b.delay_after(1), Duration::from_millis(500));
        assert_eq!(b.delay_after(4), Duration::from_secs(4));
        assert_eq!(b.delay_after(200), Duration::from_secs(30));
    }

    #[test]
    fn a_jittered_wait_stays_within_half_and_one_and_a_half_times() {
        let d = Duration::from_millis(1000);
        let waits: Vec<Duration> = (0..200).map(|_| jittered(d)).collect();
        assert!(waits.iter().all(|w| *w >= d / 2 && *w < d * 3 / 2), "{waits:?}");
        assert!(waits.iter().any(|w| *w != waits[0]), "not randomised: {waits:?}");
    }
}
