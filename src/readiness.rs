//! Readiness and draining: the one piece of state the HTTP layer, the
//! batcher and the workers all read.
//!
//! Owns: how many workers are serving, whether every one of them has started
//! once, and whether the engine is draining. Lock-free (atomics). Must not touch: anything else; this is a
//! leaf module, so the batcher and the workers depend on it rather than on
//! the engine that assembles them.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::error::ServeError;

/// Shared readiness of one engine.
pub struct Readiness {
    workers: usize,
    serving_workers: AtomicUsize,
    /// Set once every worker has started: before that the engine is starting.
    all_started: AtomicBool,
    draining: AtomicBool,
}

impl Readiness {
    /// An engine of `workers` workers, none ready yet.
    pub fn new(workers: usize) -> Readiness {
        Readiness {
            workers,
            serving_workers: AtomicUsize::new(0),
            all_started: AtomicBool::new(false),
            draining: AtomicBool::new(false),
        }
    }

    /// A worker (warmed up, or a replacement) serves.
    pub fn worker_ready(&self) {
        let serving = self.serving_workers.fetch_add(1, Ordering::AcqRel) + 1;
        if serving >= self.workers {
            self.all_started.store(true, Ordering::Release);
        }
    }

    /// A worker stopped serving (it will be replaced).
    pub fn worker_lost(&self) {
        // Never below zero, even if a loss were reported twice.
        let _ = self
            .serving_workers
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    /// Every worker has started once, at least one serves now, and not
    /// draining: some worker can take work.
    pub fn is_ready(&self) -> bool {
        !self.is_draining()
            && self.all_started.load(Ordering::Acquire)
            && self.serving_workers.load(Ordering::Acquire) > 0
    }

    /// Workers serving now.
    pub fn serving_workers(&self) -> usize {
        self.serving_workers.load(Ordering::Acquire)
    }

    /// `Ok` when ready, else the 503 error saying why (starting or draining).
    pub fn check(&self) -> Result<(), ServeError> {
        match self.state() {
            State::Ready => Ok(()),
            not => Err(ServeError::NotReady(not.as_str())),
        }
    }

    /// Where the engine is in its life.
    pub fn state(&self) -> State {
        if self.is_draining() {
            State::Draining
        } else if self.is_ready() {
            State::Ready
        } else if self.all_started.load(Ordering::Acquire) {
            State::Recovering
        } else {
            State::Starting
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Workers in the pool.
    pub fn workers(&self) -> usize {
        self.workers
    }
}

/// The engine's life stage, as `/readyz` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Starting,
    Ready,
    /// Started, but no worker serves right now (they are being replaced).
    Recovering,
    Draining,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Ready => "ready",
            State::Recovering => "recovering",
            State::Draining => "draining",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_once_every_worker_is_and_never_while_draining() {
        let r = Readiness::new(2);
        assert_eq!(r.state(), State::Starting);
        assert!(matches!(r.check(), Err(ServeError::NotReady("starting"))));
        r.worker_ready();
        assert!(!r.is_ready());
        r.worker_ready();
        assert_eq!(r.state(), State::Ready);
        assert!(r.check().is_ok());
        // One worker lost: the other still takes work.
        r.worker_lost();
        assert!(r.is_ready());
        // None left: not ready until a replacement serves.
        r.worker_lost();
        r.worker_lost();
        assert_eq!((r.state(), r.serving_workers()), (State::Recovering, 0));
        assert!(matches!(r.check(), Err(ServeError::NotReady("recovering"))));
        r.worker_ready();
        assert!(r.is_ready());
        r.start_draining();
        assert_eq!(r.state(), State::Draining);
        assert!(matches!(r.check(), Err(ServeError::NotReady("draining"))));
    }
}
