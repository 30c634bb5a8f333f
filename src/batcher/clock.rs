//! The batcher's two timers: alarms on the process-wide timer thread
//! ([`Timer::shared`]) that tell the batcher when a held batch may go or a
//! queued request's deadline passes.
//!
//! Role: the batcher has no thread of its own (it runs on whichever thread
//! sends it a message), so something that sleeps must wake it at an instant
//! when no message may come. One alarm per [`TimerKind`]; arming one again
//! replaces its deadline. When it fires, the batcher's handler runs on the
//! timer thread. Needs no runtime: a batcher starts from any thread.
//! Must not touch: what the batcher does when woken.

use std::time::Instant;

use super::Message as BatcherMessage;
use crate::mailbox::{Alarm, Sender, Timer};

/// The batcher's two timers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimerKind {
    /// A held partial batch may go (queue delay or regroup hold).
    Delay,
    /// The earliest deadline of a request still queued.
    Expiry,
}

/// The batcher's alarms, each sending [`BatcherMessage::Timer`] with its kind.
pub struct Clock {
    delay: Alarm,
    expiry: Alarm,
}

impl Clock {
    /// The alarms, on the shared timer thread (started here if none runs),
    /// sending to `batcher`. Fails only if the OS refuses that thread.
    pub fn new(batcher: Sender<BatcherMessage>) -> std::io::Result<Clock> {
        let timer = Timer::shared()?;
        let fired = batcher.map(BatcherMessage::Timer);
        Ok(Clock {
            delay: timer.alarm(fired.clone(), TimerKind::Delay),
            expiry: timer.alarm(fired, TimerKind::Expiry),
        })
    }

    /// Fires timer `kind` at `at`, replacing the deadline armed before, if
    /// any. Costs a lock and a heap push (no allocation), and wakes the
    /// timer thread only when `at` is the earliest deadline it holds.
    pub fn arm(&self, kind: TimerKind, at: Instant) {
        match kind {
            TimerKind::Delay => self.delay.arm(at),
            TimerKind::Expiry => self.expiry.arm(at),
        }
    }
}
