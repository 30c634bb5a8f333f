//! How the engine's own actors (the batcher, the workers) receive messages,
//! without a wake-up of another thread per hand-off.
//!
//! Why not actix for these two: with actix every message to an actor that
//! lives on another arbiter is a wake-up of that arbiter's thread (an eventfd
//! write, an epoll return and a context switch), and a `SyncArbiter` worker's
//! messages pass through the system arbiter first. A single-row request
//! crossed four threads that way (HTTP -> batcher -> worker -> HTTP, and the
//! worker's "done" back to the batcher), and at one connection half of the
//! server's CPU went to those wake-ups (BENCHMARKS.md, section 10).
//!
//! Owns:
//! - [`Mailbox`]: an actor with no thread of its own. Whoever sends it a
//!   message and finds it idle runs its handler right there, on the sending
//!   thread, then every message that arrived meanwhile; a sender that finds
//!   it busy leaves the message in the inbox, and the thread that is running
//!   it handles that message before it lets go. So handlers run one at a
//!   time, in arrival order, with exclusive access to the actor's state, and
//!   no sender ever waits for another (the actor's state is never held across
//!   compute or I/O: handlers only move jobs and send messages). An HTTP
//!   thread submitting to an idle batcher dispatches the batch itself; a
//!   worker that finishes a batch takes the next one itself.
//! - [`spawn_thread`]: an actor on an OS thread of its own that blocks on its
//!   inbox (the workers: compute must not run on the async HTTP threads).
//! - [`Sender`]: where to send messages of one type, whatever runs the
//!   receiver, so each actor can be tested alone against fakes.
//! - [`Timer`] and [`Alarm`] ([`timer`]): a message sent at an instant, for
//!   an actor with no thread of its own to sleep on (the batcher's queue
//!   delay and request expiry), from one timer thread for the process.
//!   With these the engine's actors need no runtime: a model version starts
//!   from any thread.
//!
//! Must not touch: what the actors do (batching policy, compute).

pub mod timer;

pub use timer::{Alarm, Timer};

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use parking_lot::Mutex;

/// An actor: state plus one handler for its message type (an enum when it
/// takes several kinds).
pub trait Actor: Send + 'static {
    type Message: Send + 'static;

    /// Handles one message. Must not block: it may run on any sender's
    /// thread, an HTTP thread among them.
    fn handle(&mut self, message: Self::Message);
}

/// Where to send messages of type `M`. Sending never blocks; a message sent
/// to an actor that has ended is dropped (what it carried is dropped with it,
/// so a job's reply channel closes and its caller gets an error).
pub struct Sender<M> {
    deliver: Arc<dyn Fn(M) + Send + Sync>,
}

impl<M> Clone for Sender<M> {
    fn clone(&self) -> Self {
        Sender {
            deliver: Arc::clone(&self.deliver),
        }
    }
}

impl<M: Send + 'static> Sender<M> {
    /// A sender that hands each message to `deliver`.
    pub fn from_fn(deliver: impl Fn(M) + Send + Sync + 'static) -> Sender<M> {
        Sender {
            deliver: Arc::new(deliver),
        }
    }

    pub fn send(&self, message: M) {
        (self.deliver)(message)
    }

    /// A sender of `N`, each wrapped into an `M` (one variant of an actor's
    /// message enum).
    pub fn map<N: Send + 'static>(&self, wrap: fn(N) -> M) -> Sender<N> {
        let inner = self.clone();
        Sender::from_fn(move |n| inner.send(wrap(n)))
    }
}

/// An actor run by the threads that send to it (see the module doc).
pub struct Mailbox<A: Actor> {
    shared: Arc<Shared<A>>,
}

struct Shared<A: Actor> {
    actor: Mutex<A>,
    inbox: Mutex<VecDeque<A::Message>>,
}

impl<A: Actor> Clone for Mailbox<A> {
    fn clone(&self) -> Self {
        Mailbox {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<A: Actor> Mailbox<A> {
    pub fn new(actor: A) -> Mailbox<A> {
        Mailbox {
            shared: Arc::new(Shared {
                actor: Mutex::new(actor),
                inbox: Mutex::new(VecDeque::new()),
            }),
        }
    }

    /// Queues `message`, then runs the actor here if no other thread is
    /// running it. Returns once the message is handled, or, when another
    /// thread is running the actor, at once (that thread handles it).
    pub fn send(&self, message: A::Message) {
        self.shared.inbox.lock().push_back(message);
        self.run();
    }

    pub fn sender(&self) -> Sender<A::Message> {
        let mailbox = self.clone();
        Sender::from_fn(move |m| mailbox.send(m))
    }

    /// A sender that does not keep the actor alive: once every other holder
    /// let go, its messages are dropped.
    pub fn weak_sender(&self) -> Sender<A::Message> {
        let weak = Arc::downgrade(&self.shared);
        Sender::from_fn(move |m| {
            if let Some(shared) = weak.upgrade() {
                Mailbox { shared }.send(m);
            }
        })
    }

    /// Handles queued messages until the inbox is empty, unless another
    /// thread holds the actor. The check after letting go closes the window
    /// where a message arrives just as the running thread finds the inbox
    /// empty: its sender failed to take the actor, so this thread sees the
    /// message (both go through the inbox's lock) and goes round again.
    fn run(&self) {
        loop {
            let Some(mut actor) = self.shared.actor.try_lock() else {
                return;
            };
            loop {
                let next = self.shared.inbox.lock().pop_front();
                let Some(message) = next else { break };
                // A handler that panics must not take the sending thread (an
                // HTTP thread, a worker) down with it, nor leave the actor
                // unusable: the message is lost and logged, the actor goes on.
                if catch_unwind(AssertUnwindSafe(|| actor.handle(message))).is_err() {
                    tracing::error!(actor = std::any::type_name::<A>(), "an actor's handler panicked");
                }
            }
            drop(actor);
            if self.shared.inbox.lock().is_empty() {
                return;
            }
        }
    }

    /// Runs `f` on the actor's state once it is idle (tests and start-up).
    pub fn with<R>(&self, f: impl FnOnce(&mut A) -> R) -> R {
        let result = f(&mut self.shared.actor.lock());
        self.run();
        result
    }
}

/// Starts `actor` on an OS thread of its own named `name`, handling its
/// messages in order as they arrive and sleeping when there are none. The
/// thread ends when every sender is dropped, or when a handler panics (the
/// actor is then dropped while the panic unwinds, so its `Drop` can tell).
pub fn spawn_thread<A: Actor>(name: String, mut actor: A) -> std::io::Result<Sender<A::Message>> {
    let (tx, rx) = crossbeam_channel::unbounded::<A::Message>();
    std::thread::Builder::new().name(name).spawn(move || {
        for message in rx {
            actor.handle(message);
        }
    })?;
    Ok(Sender::from_fn(move |m| {
        // The thread ended (its actor failed): the message is dropped.
        let _ = tx.send(m);
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Records the order it handled messages in; message 0 panics.
    struct Recorder {
        seen: Arc<Mutex<Vec<usize>>>,
        /// Sends to itself from inside a handler, once.
        me: Option<Sender<usize>>,
    }

    impl Actor for Recorder {
        type Message = usize;
        fn handle(&mut self, n: usize) {
            assert_ne!(n, 0, "message 0 panics");
            self.seen.lock().push(n);
            if let Some(me) = self.me.take() {
                me.send(n * 100);
            }
        }
    }

    #[test]
    fn messages_are_handled_in_order_including_ones_sent_from_a_handler_and_after_a_panic() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mailbox = Mailbox::new(Recorder {
            seen: Arc::clone(&seen),
            me: None,
        });
        let me = mailbox.sender();
        mailbox.with(|r| r.me = Some(me));
        mailbox.send(1);
        mailbox.send(0);
        mailbox.send(2);
        assert_eq!(*seen.lock(), vec![1, 100, 2]);
    }

    struct Counter {
        count: Arc<AtomicUsize>,
        /// Detects two threads inside `handle` at once.
        inside: Arc<AtomicUsize>,
    }

    impl Actor for Counter {
        type Message = ();
        fn handle(&mut self, (): ()) {
            assert_eq!(self.inside.fetch_add(1, Ordering::SeqCst), 0, "two handlers at once");
            self.count.fetch_add(1, Ordering::SeqCst);
            self.inside.fetch_sub(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn concurrent_senders_never_lose_a_message_nor_run_two_handlers_at_once() {
        let count = Arc::new(AtomicUsize::new(0));
        let inside = Arc::new(AtomicUsize::new(0));
        let mailbox = Mailbox::new(Counter {
            count: Arc::clone(&count),
            inside: Arc::clone(&inside),
        });
        std::thread::scope(|s| {
            for _ in 0..4 {
                let sender = mailbox.sender();
                s.spawn(move || {
                    for _ in 0..20_000 {
                        sender.send(());
                    }
                });
            }
        });
        // Every sender has returned; the last one to run the actor emptied
        // the inbox before it let go.
        assert_eq!(count.load(Ordering::SeqCst), 80_000);
        assert_eq!(inside.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_thread_actor_handles_in_order_and_a_dead_one_drops_messages() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (done_tx, done_rx) = crossbeam_channel::unbounded();
        struct Echo {
            seen: Arc<Mutex<Vec<usize>>>,
            done: crossbeam_channel::Sender<()>,
        }
        impl Actor for Echo {
            type Message = usize;
            fn handle(&mut self, n: usize) {
                if n == 0 {
                    panic!("message 0 ends the thread");
                }
                self.seen.lock().push(n);
                let _ = self.done.send(());
            }
        }
        let sender = spawn_thread(
            "echo".into(),
            Echo {
                seen: Arc::clone(&seen),
                done: done_tx,
            },
        )
        .unwrap();
        for n in 1..=3 {
            sender.send(n);
        }
        for _ in 0..3 {
            done_rx.recv().unwrap();
        }
        assert_eq!(*seen.lock(), vec![1, 2, 3]);
        sender.send(0);
        // The actor (and its `done` sender) is dropped as the thread ends.
        assert!(done_rx.recv().is_err());
        sender.send(4); // dropped, no panic here
        assert_eq!(*seen.lock(), vec![1, 2, 3]);
    }
}
