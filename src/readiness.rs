//! One served version's life and readiness: the one piece of state the
//! repository, the batcher, the pool and the workers all read.
//!
//! Owns: [`VersionState`] (loading, ready, draining, retired: the single
//! "does this version take work" switch, one atomic per version), how many
//! of its workers serve, and the `/readyz` words derived from both
//! ([`State`]). Lock-free (atomics). Must not touch: anything else; this is
//! a leaf module, so the batcher, the workers and the served version depend
//! on it rather than on what assembles them. The server-wide "shutting
//! down" flag is the registry's; it moves every version here to `Draining`.

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

use crate::error::EngineError;

/// Where one served version is in its life. Moves only forward:
/// `Loading -> Ready -> Draining -> Retired` (a step may be skipped).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum VersionState {
    /// Its workers are starting; not every one has served yet.
    Loading = 0,
    /// Every worker started once: it takes work.
    Ready = 1,
    /// The server is shutting down: it takes no new work, answers what it
    /// accepted, and starts no replacement worker.
    Draining = 2,
    /// Its last holder let go (out of service, every accepted request
    /// answered): anything still queued fails, its workers end.
    Retired = 3,
}

impl VersionState {
    fn from_u8(v: u8) -> VersionState {
        match v {
            0 => VersionState::Loading,
            1 => VersionState::Ready,
            2 => VersionState::Draining,
            _ => VersionState::Retired,
        }
    }

    /// Whether the version still takes new work (and replaces lost workers).
    pub fn takes_work(self) -> bool {
        self <= VersionState::Ready
    }
}

/// The state and worker count of one served version.
pub struct Readiness {
    workers: usize,
    serving_workers: AtomicUsize,
    state: AtomicU8,
}

impl Readiness {
    /// A version of `workers` workers, none ready yet (`Loading`).
    pub fn new(workers: usize) -> Readiness {
        Readiness {
            workers,
            serving_workers: AtomicUsize::new(0),
            state: AtomicU8::new(VersionState::Loading as u8),
        }
    }

    /// A worker (warmed up, or a replacement) serves. The last of the first
    /// `workers` to start moves the version from `Loading` to `Ready`.
    pub fn worker_ready(&self) {
        let serving = self.serving_workers.fetch_add(1, Ordering::AcqRel) + 1;
        if serving >= self.workers {
            self.advance(VersionState::Ready);
        }
    }

    /// A worker stopped serving (it will be replaced).
    pub fn worker_lost(&self) {
        // Never below zero, even if a loss were reported twice.
        let _ = self
            .serving_workers
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    /// The version's life stage now.
    pub fn version_state(&self) -> VersionState {
        VersionState::from_u8(self.state.load(Ordering::Acquire))
    }

    /// Moves the version to `to` unless it is already there or further on
    /// (the state never goes back). Returns the state it was in.
    pub fn advance(&self, to: VersionState) -> VersionState {
        let was = self.state.fetch_max(to as u8, Ordering::AcqRel);
        VersionState::from_u8(was)
    }

    /// Every worker has started once, at least one serves now, and it still
    /// takes work: some worker can take a request.
    pub fn is_ready(&self) -> bool {
        self.version_state() == VersionState::Ready && self.serving_workers.load(Ordering::Acquire) > 0
    }

    /// Workers serving now.
    pub fn serving_workers(&self) -> usize {
        self.serving_workers.load(Ordering::Acquire)
    }

    /// `Ok` when ready, else the 503 error saying why (starting or draining).
    pub fn check(&self) -> Result<(), EngineError> {
        match self.state() {
            State::Ready => Ok(()),
            not => Err(EngineError::NotReady(not.as_str())),
        }
    }

    /// The version's state in `/readyz`'s words.
    pub fn state(&self) -> State {
        match self.version_state() {
            VersionState::Loading => State::Starting,
            VersionState::Ready if self.serving_workers() > 0 => State::Ready,
            VersionState::Ready => State::Recovering,
            VersionState::Draining | VersionState::Retired => State::Draining,
        }
    }

    /// Takes no new work: shutting down (`Draining`) or retired.
    pub fn is_draining(&self) -> bool {
        !self.version_state().takes_work()
    }

    /// Shutting down: no new work, no replacement workers.
    pub fn start_draining(&self) {
        self.advance(VersionState::Draining);
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
        assert!(matches!(r.check(), Err(EngineError::NotReady("starting"))));
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
        assert!(matches!(r.check(), Err(EngineError::NotReady("recovering"))));
        r.worker_ready();
        assert!(r.is_ready());
        r.start_draining();
        assert_eq!(r.state(), State::Draining);
        assert!(matches!(r.check(), Err(EngineError::NotReady("draining"))));
    }

    #[test]
    fn the_version_state_only_moves_forward() {
        let r = Readiness::new(1);
        assert_eq!(r.version_state(), VersionState::Loading);
        assert_eq!(r.advance(VersionState::Retired), VersionState::Loading);
        // A worker starting late does not bring a retired version back.
        r.worker_ready();
        r.start_draining();
        assert_eq!(r.version_state(), VersionState::Retired);
        assert!(r.is_draining() && !r.is_ready());
    }
}
