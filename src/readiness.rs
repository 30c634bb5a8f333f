//! Readiness and draining: the one piece of state the HTTP layer, the
//! batcher and the workers all read.
//!
//! Owns: how many workers are warmed up and serving, and whether the engine
//! is draining. Lock-free (atomics). Must not touch: anything else; this is a
//! leaf module, so the batcher and the workers depend on it rather than on
//! the engine that assembles them.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::error::ServeError;

/// Shared readiness of one engine.
pub struct Readiness {
    workers: usize,
    ready_workers: AtomicUsize,
    draining: AtomicBool,
}

impl Readiness {
    /// An engine of `workers` workers, none ready yet.
    pub fn new(workers: usize) -> Readiness {
        Readiness {
            workers,
            ready_workers: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
        }
    }

    /// A worker finished its warm-up and serves.
    pub fn worker_ready(&self) {
        self.ready_workers.fetch_add(1, Ordering::AcqRel);
    }

    /// Every worker warmed up, and not draining.
    pub fn is_ready(&self) -> bool {
        !self.is_draining() && self.ready_workers.load(Ordering::Acquire) >= self.workers
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
    Draining,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Ready => "ready",
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
        r.start_draining();
        assert_eq!(r.state(), State::Draining);
        assert!(matches!(r.check(), Err(ServeError::NotReady("draining"))));
    }
}
