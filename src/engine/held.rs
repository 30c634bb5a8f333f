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
/// open until its keep-alive ends; and each HTTP connection is counted here
/// while open, so the drain can wait until the last one has closed.
#[derive(Debug, Clone)]
pub struct DrainSignal {
    raised: Arc<watch::Sender<bool>>,
    open: Arc<watch::Sender<usize>>,
}

impl Default for DrainSignal {
    fn default() -> Self {
        DrainSignal {
            raised: Arc::new(watch::channel(false).0),
            open: Arc::new(watch::channel(0).0),
        }
    }
}

impl DrainSignal {
    pub fn raise(&self) {
        self.raised.send_replace(true);
    }

    /// Resolves once the signal is raised (at once if it already was).
    pub fn raised(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.raised.subscribe();
        async move {
            // An error means the sender is gone: the server is gone too.
            let _ = rx.wait_for(|raised| *raised).await;
        }
    }

    /// A connection opened; it counts as open until the value drops.
    pub fn connection_opened(&self) -> OpenConnection {
        self.open.send_modify(|n| *n += 1);
        OpenConnection(Arc::clone(&self.open))
    }

    /// Resolves once no connection is open (at once if none is).
    pub async fn connections_closed(&self) {
        let mut rx = self.open.subscribe();
        let _ = rx.wait_for(|open| *open == 0).await;
    }
}

/// One open connection, counted in its [`DrainSignal`] until dropped.
#[derive(Debug)]
pub struct OpenConnection(Arc<watch::Sender<usize>>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    #[test]
    fn the_drain_waits_for_the_last_open_connection() {
        let drain = DrainSignal::default();
        assert!(drain.connections_closed().now_or_never().is_some(), "none open");
        let a = drain.connection_opened();
        let b = drain.clone().connection_opened();
        assert!(drain.connections_closed().now_or_never().is_none());
        drop(a);
        assert!(drain.connections_closed().now_or_never().is_none(), "one still open");
        drop(b);
        assert!(drain.connections_closed().now_or_never().is_some());
    }

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
