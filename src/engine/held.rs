//! Answers held for slow readers: the memory budget every protocol's
//! unsent answers count against, and the drain signal connections watch.
//!
//! Owns: [`HeldAnswers`], the count of answer bytes that are computed but
//! that a client has not taken yet (its socket or its HTTP/2 window is
//! full), bounded by `server.max_pending_answer_bytes`; [`Holding`], one
//! connection's or stream's share of it (returned when it drops, so a
//! connection that is closed can never leak budget); and [`DrainSignal`],
//! which tells open connections that the server is shutting down. Must not
//! touch: how a protocol detects an unsent answer or closes a connection
//! (`http/conn.rs`, `grpc/held.rs`); this is shared bookkeeping only.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::watch;

use crate::error::EngineError;

/// Answer bytes waiting for their clients, all protocols together.
#[derive(Debug)]
pub struct HeldAnswers {
    held: AtomicUsize,
    budget: usize,
}

impl HeldAnswers {
    /// An empty account with room for `budget` bytes.
    pub fn new(budget: usize) -> Arc<HeldAnswers> {
        Arc::new(HeldAnswers {
            held: AtomicUsize::new(0),
            budget,
        })
    }

    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// `server.max_pending_answer_bytes`.
    pub fn budget(&self) -> usize {
        self.budget
    }

    /// Whether a new request must be refused: the answers already waiting
    /// use the whole budget, and another answer would add to them.
    pub fn is_full(&self) -> bool {
        self.held() >= self.budget
    }

    /// `Err` (503 / UNAVAILABLE) while [`HeldAnswers::is_full`]: an
    /// inference request is refused before it is computed.
    pub fn admit(&self) -> Result<(), EngineError> {
        if self.is_full() {
            return Err(EngineError::AnswersHeld {
                held: self.held(),
                limit: self.budget,
            });
        }
        Ok(())
    }
}

/// One holder's share of [`HeldAnswers`]: set to what it holds now, given
/// back in full when dropped.
#[derive(Debug)]
pub struct Holding {
    account: Arc<HeldAnswers>,
    bytes: usize,
}

impl Holding {
    pub fn new(account: Arc<HeldAnswers>) -> Holding {
        Holding { account, bytes: 0 }
    }

    /// This holder now holds `bytes` (the account moves by the difference).
    pub fn set(&mut self, bytes: usize) {
        if bytes > self.bytes {
            self.account.held.fetch_add(bytes - self.bytes, Ordering::Relaxed);
        } else if bytes < self.bytes {
            self.account.held.fetch_sub(self.bytes - bytes, Ordering::Relaxed);
        }
        self.bytes = bytes;
    }
}

impl Drop for Holding {
    fn drop(&mut self) {
        self.set(0);
    }
}

/// Raised once when the server starts draining. Connections watch it so an
/// idle keep-alive connection closes at once instead of holding the drain
/// open until its keep-alive ends.
#[derive(Debug, Clone)]
pub struct DrainSignal(Arc<watch::Sender<bool>>);

impl Default for DrainSignal {
    fn default() -> Self {
        DrainSignal(Arc::new(watch::channel(false).0))
    }
}

impl DrainSignal {
    pub fn raise(&self) {
        self.0.send_replace(true);
    }

    /// Resolves once the signal is raised (at once if it already was).
    pub fn raised(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.0.subscribe();
        async move {
            // An error means the sender is gone: the server is gone too.
            let _ = rx.wait_for(|raised| *raised).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holdings_move_the_account_and_return_it_when_dropped() {
        let account = HeldAnswers::new(100);
        let mut a = Holding::new(Arc::clone(&account));
        let mut b = Holding::new(Arc::clone(&account));
        a.set(60);
        b.set(30);
        assert_eq!(account.held(), 90);
        assert!(!account.is_full());
        b.set(50);
        assert!(account.is_full());
        a.set(10);
        assert_eq!(account.held(), 60);
        drop(b);
        drop(a);
        assert_eq!(account.held(), 0);
    }
}
