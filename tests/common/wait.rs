//! Waiting for facts: `eventually` polls a condition with a short backoff until it holds, and panics
//! naming what was awaited and what was seen last. Tests wait for what they assert, never for a
//! fixed time; a fixed sleep is only for asserting that something does *not* happen.

use std::fmt::{Debug, Display};
use std::time::{Duration, Instant};

use labeld::backoff::Backoff;

/// What a condition returns: `bool`, `Option<T>` (the value once there), or `Result<T, E>` (the value,
/// or what is seen instead, shown if the wait times out).
pub trait Fact {
    type Value;
    type Seen: Display;
    fn check(self) -> Result<Self::Value, Option<Self::Seen>>;
}

impl Fact for bool {
    type Value = ();
    type Seen = String;
    fn check(self) -> Result<(), Option<String>> {
        if self { Ok(()) } else { Err(None) }
    }
}

impl<T> Fact for Option<T> {
    type Value = T;
    type Seen = String;
    fn check(self) -> Result<T, Option<String>> {
        self.ok_or(None)
    }
}

impl<T, E: Display> Fact for Result<T, E> {
    type Value = T;
    type Seen = E;
    fn check(self) -> Result<T, Option<E>> {
        self.map_err(Some)
    }
}

/// The first poll comes at once, the next after this, doubling up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(1);
const MAX_BACKOFF: Duration = Duration::from_millis(50);

/// Polls `condition` until it holds and returns its value; after `timeout`, `Err` with what was seen
/// last. For places that must not panic (a `Drop`) and loops that end either way.
pub fn within<F: Fact>(timeout: Duration, mut condition: impl FnMut() -> F) -> Result<F::Value, Option<F::Seen>> {
    let start = Instant::now();
    let mut pause = Backoff::new(FIRST_BACKOFF, MAX_BACKOFF);
    loop {
        match condition().check() {
            Ok(v) => return Ok(v),
            Err(seen) if start.elapsed() >= timeout => return Err(seen),
            Err(_) => {}
        }
        std::thread::sleep(pause.failed(Instant::now()).min(timeout.saturating_sub(start.elapsed())));
    }
}

/// Polls `condition` until it holds and returns its value; after `timeout`, panics with `what` and
/// what the condition saw last (an `Err`'s contents).
pub fn eventually<F: Fact>(what: impl Display, timeout: Duration, condition: impl FnMut() -> F) -> F::Value {
    match within(timeout, condition) {
        Ok(v) => v,
        Err(Some(seen)) => panic!("{what}: not within {timeout:?}; last seen: {seen}"),
        Err(None) => panic!("{what}: not within {timeout:?}"),
    }
}

/// Polls `value` until it has not changed for `quiet` (at most `timeout`), and returns it: for
/// asserting that nothing more happens once the expected has.
pub fn settled<T: PartialEq + Clone + Debug>(what: impl Display, quiet: Duration, timeout: Duration, mut value: impl FnMut() -> T) -> T {
    let mut last: Option<(T, Instant)> = None;
    eventually(what, timeout, || {
        let now = value();
        match &last {
            Some((was, since)) if *was == now => {
                if since.elapsed() >= quiet {
                    return Ok(now);
                }
            }
            _ => last = Some((now.clone(), Instant::now())),
        }
        Err(Shown(now))
    })
}

/// A value shown with its `Debug` form where a `Display` one is wanted.
pub struct Shown<T>(pub T);

impl<T: Debug> Display for Shown<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.0)
    }
}
