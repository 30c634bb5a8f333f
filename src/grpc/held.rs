//! gRPC answers a client does not take: the send deadline of each stream
//! and its share of `server.max_pending_answer_bytes`.
//!
//! Owns: [`StreamExecutor`], the executor hyper spawns each HTTP/2 stream's
//! task on (each task is wrapped in a [`SendBounded`] that drops it, and so
//! resets its stream, when its answer has not drained in time); [`SendState`],
//! one stream's unsent answer, reachable from the response body through a
//! task-local while the stream's task is polled; and [`HeldData`], the body
//! side: it hands the answer to hyper in pieces of at most [`PIECE`] bytes
//! and counts what hyper has not taken yet. Must not touch: what a call
//! answers, call metrics (`server.rs`).
//!
//! Why: a client that grants no flow-control window gets the response
//! headers but no data, and hyper holds the answer (waiting for window)
//! with no time limit. Handing the answer over in pieces keeps all but one
//! piece here, where it is counted, and keeps the stream's task alive until
//! the last piece is taken, so the deadline applies to the whole answer.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::engine::held::{HeldAnswers, Holding};

/// Most bytes of an answer handed to hyper at once: what may still sit in
/// HTTP/2 buffers, uncounted, once the stream's task has ended.
pub const PIECE: usize = 16 * 1024;

tokio::task_local! {
    /// The send state of the stream whose task is being polled.
    static STREAM: Arc<SendState>;
}

/// One stream's unsent answer.
pub struct SendState {
    inner: Mutex<Unsent>,
}

struct Unsent {
    holding: Holding,
    /// Since when part of the answer has been waiting for the client.
    since: Option<Instant>,
    /// The call's deadline: the answer may take until then to drain.
    deadline: Option<Instant>,
}

impl SendState {
    fn new(account: Arc<HeldAnswers>) -> Arc<SendState> {
        Arc::new(SendState {
            inner: Mutex::new(Unsent {
                holding: Holding::new(account),
                since: None,
                deadline: None,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Unsent> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The stream now holds `bytes` unsent (0: all taken).
    fn holds(&self, bytes: usize) {
        let mut unsent = self.lock();
        unsent.holding.set(bytes);
        if bytes == 0 {
            unsent.since = None;
        } else if unsent.since.is_none() {
            unsent.since = Some(Instant::now());
        }
    }

    fn send_deadline(&self, send_timeout: Duration) -> Option<Instant> {
        let unsent = self.lock();
        let deadline = unsent.since? + send_timeout;
        Some(unsent.deadline.map_or(deadline, |d| d.max(deadline)))
    }
}

/// The send state of the stream being polled now, with the call's deadline
/// recorded (`None` outside a stream's task).
pub fn current_stream(deadline: Instant) -> Option<Arc<SendState>> {
    let state = STREAM.try_with(Arc::clone).ok()?;
    state.lock().deadline = Some(deadline);
    Some(state)
}

/// The response body's side: hands the answer over in pieces and keeps the
/// stream's count of what hyper has not taken.
#[derive(Default)]
pub struct HeldData {
    state: Option<Arc<SendState>>,
    /// The part of a data frame not handed over yet.
    rest: Bytes,
}

impl HeldData {
    pub fn new(state: Option<Arc<SendState>>) -> HeldData {
        HeldData {
            state,
            rest: Bytes::new(),
        }
    }

    /// The next piece of the frame being handed over, if any. hyper polls
    /// the body only once the last piece went to HTTP/2, so nothing else is
    /// waiting when this is asked.
    pub fn next_piece(&mut self) -> Option<Bytes> {
        if self.rest.is_empty() {
            self.count(0);
            return None;
        }
        Some(self.piece())
    }

    /// Starts handing over `data`; returns its first piece.
    pub fn start(&mut self, data: Bytes) -> Bytes {
        self.rest = data;
        self.piece()
    }

    fn piece(&mut self) -> Bytes {
        let piece = self.rest.split_to(self.rest.len().min(PIECE));
        // The piece waits in hyper until the client's window takes it.
        self.count(piece.len() + self.rest.len());
        piece
    }

    /// Part of a data frame is still to be handed over.
    pub fn has_rest(&self) -> bool {
        !self.rest.is_empty()
    }

    /// Nothing is left to send (trailers, the end, an error).
    pub fn done(&mut self) {
        self.rest = Bytes::new();
        self.count(0);
    }

    fn count(&self, bytes: usize) {
        if let Some(state) = &self.state {
            state.holds(bytes);
        }
    }
}

/// hyper's executor for stream tasks: each runs on tokio inside a
/// [`SendBounded`].
#[derive(Clone)]
pub struct StreamExecutor {
    pub send_timeout: Duration,
    pub held: Arc<HeldAnswers>,
}

impl<F> hyper::rt::Executor<F> for StreamExecutor
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(SendBounded {
            inner: Box::pin(fut),
            state: SendState::new(Arc::clone(&self.held)),
            send_timeout: self.send_timeout,
            timer: None,
        });
    }
}

/// A stream's task, ended (its stream reset, its answer freed) when its
/// answer has not drained within `server.send_timeout_ms` or the call's
/// deadline, whichever is later.
pub struct SendBounded<F> {
    inner: Pin<Box<F>>,
    state: Arc<SendState>,
    send_timeout: Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<F: Future<Output = ()>> Future for SendBounded<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let inner = &mut this.inner;
        if STREAM
            .sync_scope(Arc::clone(&this.state), || inner.as_mut().poll(cx))
            .is_ready()
        {
            return Poll::Ready(());
        }
        let Some(deadline) = this.state.send_deadline(this.send_timeout) else {
            this.timer = None;
            return Poll::Pending;
        };
        let deadline = tokio::time::Instant::from_std(deadline);
        let sleep = match &mut this.timer {
            Some(sleep) if sleep.deadline() == deadline => sleep,
            timer => timer.insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        if sleep.as_mut().poll(cx).is_ready() {
            // Dropping the task drops its send stream: h2 resets the stream
            // (CANCEL) and frees what it buffered for it.
            tracing::debug!("a gRPC answer did not drain within server.send_timeout_ms: stream reset");
            return Poll::Ready(());
        }
        Poll::Pending
    }
}
