//! The batcher's timers: an actix actor, on the arbiter that started the
//! model version (the system arbiter at start-up, the thread that ran a
//! load later), that tells the batcher when a held batch may go or a queued
//! request's deadline passes.
//!
//! Role: the batcher has no thread of its own (it runs on whichever thread
//! sends it a message), so something that sleeps must wake it at an instant
//! when no message may come. One timer per [`TimerKind`]; arming one again
//! replaces it. The batcher arms a timer only when one can matter, since
//! each [`Arm`] is a message to another thread.
//! Must not touch: what the batcher does when woken.

use std::time::Instant;

use actix::prelude::*;

use super::Message as BatcherMessage;
use crate::mailbox::Sender;

/// The batcher's two timers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimerKind {
    /// A held partial batch may go (queue delay or regroup hold).
    Delay,
    /// The earliest deadline of a request still queued.
    Expiry,
}

// ---- messages -------------------------------------------------------------

/// Fire timer `kind` at `at` (replacing the one armed before, if any).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Arm {
    pub kind: TimerKind,
    pub at: Instant,
}

// ---- actor ----------------------------------------------------------------

pub struct Clock {
    batcher: Sender<BatcherMessage>,
    delay: Option<SpawnHandle>,
    expiry: Option<SpawnHandle>,
}

impl Clock {
    pub fn new(batcher: Sender<BatcherMessage>) -> Clock {
        Clock {
            batcher,
            delay: None,
            expiry: None,
        }
    }

    fn slot(&mut self, kind: TimerKind) -> &mut Option<SpawnHandle> {
        match kind {
            TimerKind::Delay => &mut self.delay,
            TimerKind::Expiry => &mut self.expiry,
        }
    }
}

impl Actor for Clock {
    type Context = Context<Self>;
}

// ---- handlers -------------------------------------------------------------

impl Handler<Arm> for Clock {
    type Result = ();

    fn handle(&mut self, Arm { kind, at }: Arm, ctx: &mut Context<Self>) {
        if let Some(previous) = self.slot(kind).take() {
            ctx.cancel_future(previous);
        }
        let handle = ctx.run_later(at.saturating_duration_since(Instant::now()), move |clock, _| {
            *clock.slot(kind) = None;
            clock.batcher.send(BatcherMessage::Timer(kind));
        });
        *self.slot(kind) = Some(handle);
    }
}
