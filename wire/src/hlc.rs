use std::fmt;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// How far ahead of the local clock a remote timestamp may pull the HLC, in ms.
pub const HLC_DRIFT_MAX_MS: u64 = 60_000;

/// A hybrid logical clock timestamp: wall-clock milliseconds and a logical counter
/// that orders events within one millisecond. Totally ordered; ties between origins
/// are broken by callers with the origin id.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Hlc {
    /// Milliseconds since the Unix epoch, as the HLC believes.
    pub wall_ms: u64,
    /// Logical counter within `wall_ms`.
    pub logical: u32,
}

impl fmt::Display for Hlc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.wall_ms, self.logical)
    }
}

/// A remote timestamp was further ahead of the local clock than [`HLC_DRIFT_MAX_MS`].
/// The clock absorbed only up to the limit; the caller should raise an alarm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("remote clock {remote} is {ahead_ms} ms ahead of the local clock (limit {HLC_DRIFT_MAX_MS} ms)")]
pub struct HlcDrift {
    /// The remote timestamp.
    pub remote: Hlc,
    /// How far ahead of local wall time it was.
    pub ahead_ms: u64,
}

/// The state of a hybrid logical clock. Sans-IO: the caller passes the wall time.
///
/// ```
/// # use repl_wire::{Hlc, HlcClock};
/// let mut clock = HlcClock::default();
/// let a = clock.tick(1_000);
/// let b = clock.tick(1_000);
/// assert!(b > a);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HlcClock {
    last: Hlc,
}

impl HlcClock {
    /// A clock that has issued nothing newer than `last`.
    pub fn starting_at(last: Hlc) -> Self {
        HlcClock { last }
    }

    /// The newest timestamp issued or observed.
    pub fn last(&self) -> Hlc {
        self.last
    }

    /// A new timestamp for a local event at wall time `now_ms`, greater than any before.
    pub fn tick(&mut self, now_ms: u64) -> Hlc {
        self.last = if now_ms > self.last.wall_ms {
            Hlc { wall_ms: now_ms, logical: 0 }
        } else {
            Self::successor(self.last)
        };
        self.last
    }

    /// Absorbs a remote timestamp seen at local wall time `now_ms`.
    ///
    /// A remote clock more than [`HLC_DRIFT_MAX_MS`] ahead is absorbed only up to the
    /// limit, and reported, so one bad clock cannot drag every appliance into the future.
    pub fn observe(&mut self, remote: Hlc, now_ms: u64) -> Result<(), HlcDrift> {
        let ceiling = now_ms.saturating_add(HLC_DRIFT_MAX_MS);
        let (absorbed, drift) = if remote.wall_ms > ceiling {
            let ahead_ms = remote.wall_ms - now_ms;
            (Hlc { wall_ms: ceiling, logical: 0 }, Some(HlcDrift { remote, ahead_ms }))
        } else {
            (remote, None)
        };
        self.last = self.last.max(absorbed);
        drift.map_or(Ok(()), Err)
    }

    fn successor(h: Hlc) -> Hlc {
        match h.logical.checked_add(1) {
            Some(logical) => Hlc { wall_ms: h.wall_ms, logical },
            None => Hlc { wall_ms: h.wall_ms + 1, logical: 0 },
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn ticks_are_strictly_increasing(steps in proptest::collection::vec((0u64..5_000, any::<bool>(), 0u64..200_000), 1..200)) {
            let mut clock = HlcClock::default();
            let mut prev = clock.last();
            for (now, remote_event, remote_ms) in steps {
                if remote_event {
                    let _ = clock.observe(Hlc { wall_ms: remote_ms, logical: 3 }, now);
                    prop_assert!(clock.last() >= prev);
                    prop_assert!(clock.last().wall_ms <= now.max(prev.wall_ms) + HLC_DRIFT_MAX_MS);
                }
                let t = clock.tick(now);
                prop_assert!(t > prev);
                prop_assert!(t.wall_ms >= now);
                prev = t;
            }
        }
    }

    #[test]
    fn drift_is_capped_and_reported() {
        let mut clock = HlcClock::default();
        let far = Hlc { wall_ms: 1_000 + HLC_DRIFT_MAX_MS + 5, logical: 0 };
        let err = clock.observe(far, 1_000).expect_err("beyond the drift limit");
        assert_eq!(err.ahead_ms, HLC_DRIFT_MAX_MS + 5);
        assert_eq!(clock.last().wall_ms, 1_000 + HLC_DRIFT_MAX_MS);
        let near = Hlc { wall_ms: 1_500, logical: 7 };
        assert!(clock.observe(near, 1_000).is_ok());
    }
}
