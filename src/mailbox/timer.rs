//! Messages sent at an instant: one thread sleeping on a heap of deadlines,
//! for actors that have no thread of their own to sleep on (a [`Mailbox`]).
//!
//! Owns:
//! - [`Timer`]: the thread and its deadline heap. The thread waits on a
//!   condition variable until exactly the earliest deadline (no polling
//!   tick, so a timer's resolution is the OS's, well under a millisecond),
//!   sends what is due, and waits again. It ends once every [`Timer`] and
//!   [`Alarm`] made from it is dropped. [`Timer::shared`] is the one the
//!   engine uses: a single thread for the whole process however many model
//!   versions serve, started on first use and started again if it ended
//!   because nothing held it (so a stopped embedded server leaves no thread
//!   behind).
//! - [`Alarm`]: a re-armable timer that sends one message to one
//!   [`Sender`]. Arming it again replaces its deadline, earlier or later;
//!   [`Alarm::cancel`] and dropping it disarm it. Arming costs one lock of
//!   the timer's mutex, two reference-count increments and a push on its
//!   heap (no allocation once the heap has grown: the alarm's message and
//!   target are allocated once, when the alarm is made), and wakes the timer
//!   thread only when the new deadline is the earliest. A replaced or
//!   cancelled deadline stays in the heap, ignored when it comes up; the
//!   heap is compacted when such entries are most of it, so it stays within
//!   about twice the alarms armed. No target's code ever runs under the
//!   lock (nor a drop of it), so a target may arm or drop alarms freely.
//!
//! Messages are sent on the timer thread, outside its lock: a [`Mailbox`]'s
//! handler may run right there and arm alarms again, and a slow handler
//! delays the timers due after it (handlers must not block). A target that
//! panics is logged and the thread goes on.
//!
//! Must not touch: what the message means to its receiver.
//!
//! [`Mailbox`]: super::Mailbox

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::collections::binary_heap::PeekMut;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, PoisonError, Weak};
use std::thread::JoinHandle;
use std::time::Instant;

use parking_lot::{Condvar, Mutex, MutexGuard};

use super::Sender;

/// Replaced or cancelled deadlines the heap may hold before it is compacted
/// (and only once they are over half of it).
const COMPACT_AFTER: usize = 64;

/// The timer thread, as its users hold it (see the module doc).
#[derive(Clone)]
pub struct Timer {
    owner: Arc<Owner>,
}

/// Held by every [`Timer`] and [`Alarm`] of one thread: when the last one
/// goes, the thread is told to end.
struct Owner {
    state: Arc<State>,
}

/// What the thread and the alarms share.
struct State {
    inner: Mutex<Inner>,
    /// Signalled when the earliest deadline changes, and at shutdown.
    wake: Condvar,
}

struct Inner {
    heap: BinaryHeap<Entry>,
    /// Entries in `heap` whose alarm was re-armed, cancelled or dropped since.
    stale: usize,
    /// The last arming's number (each arming gets the next one).
    last_arm: u64,
    shutdown: bool,
}

/// Sends an alarm's message to its target.
type Fire = dyn Fn() + Send + Sync;

/// One arming of an alarm: it fires the alarm only if it is still the
/// alarm's latest arming when its instant comes. It holds nothing whose drop
/// runs a target's code (the heap drops entries under the timer's lock).
struct Entry {
    at: Instant,
    arm: u64,
    /// The alarm's [`Alarm::live`].
    live: Arc<AtomicU64>,
    fire: Weak<Fire>,
}

/// A re-armable timer that sends one message to one [`Sender`] (see the
/// module doc). Made with [`Timer::alarm`]; dropping it disarms it.
pub struct Alarm {
    timer: Timer,
    /// The arming that fires it (0: not armed). Written only under the
    /// timer's lock, so relaxed atomics suffice.
    live: Arc<AtomicU64>,
    fire: Arc<Fire>,
}

impl Timer {
    /// A timer thread of its own (tests; the engine uses [`Timer::shared`]).
    pub fn new() -> std::io::Result<Timer> {
        Timer::start().map(|(timer, _)| timer)
    }

    /// The process-wide timer thread: started on first use, shared by every
    /// holder, and started again after it ended because nothing held it.
    pub fn shared() -> std::io::Result<Timer> {
        static SHARED: std::sync::Mutex<Weak<Owner>> = std::sync::Mutex::new(Weak::new());
        let mut shared = SHARED.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(owner) = shared.upgrade() {
            return Ok(Timer { owner });
        }
        let timer = Timer::new()?;
        *shared = Arc::downgrade(&timer.owner);
        Ok(timer)
    }

    /// Starts the thread; its handle lets tests see it end.
    fn start() -> std::io::Result<(Timer, JoinHandle<()>)> {
        let state = Arc::new(State {
            inner: Mutex::new(Inner {
                heap: BinaryHeap::new(),
                stale: 0,
                last_arm: 0,
                shutdown: false,
            }),
            wake: Condvar::new(),
        });
        let thread_state = Arc::clone(&state);
        let thread = std::thread::Builder::new()
            .name("tokitai-timer".into())
            .spawn(move || run(&thread_state))?;
        let timer = Timer {
            owner: Arc::new(Owner { state }),
        };
        Ok((timer, thread))
    }

    /// An alarm, not armed yet, that sends `message` to `target` each time
    /// it fires. It keeps this timer's thread running while it lives.
    pub fn alarm<M: Clone + Send + Sync + 'static>(&self, target: Sender<M>, message: M) -> Alarm {
        Alarm {
            timer: self.clone(),
            live: Arc::new(AtomicU64::new(0)),
            fire: Arc::new(move || target.send(message.clone())),
        }
    }

    fn state(&self) -> &State {
        &self.owner.state
    }
}

impl Drop for Owner {
    fn drop(&mut self) {
        self.state.inner.lock().shutdown = true;
        self.state.wake.notify_one();
    }
}

impl Alarm {
    /// Sends the message at `at` (at once if it passed), replacing the
    /// deadline armed before, if any, whether earlier or later.
    pub fn arm(&self, at: Instant) {
        let state = self.timer.state();
        let mut inner = state.inner.lock();
        inner.last_arm += 1;
        let arm = inner.last_arm;
        if self.live.swap(arm, Relaxed) != 0 {
            inner.stale += 1;
        }
        inner.compact_if_mostly_stale();
        inner.heap.push(Entry {
            at,
            arm,
            live: Arc::clone(&self.live),
            fire: Arc::downgrade(&self.fire),
        });
        let earliest = inner.heap.peek().is_some_and(|e| e.arm == arm);
        drop(inner);
        // The thread sleeps until the deadline that was earliest: only a new
        // earliest one needs it awake.
        if earliest {
            state.wake.notify_one();
        }
    }

    /// Disarms it. A message the timer thread is sending at this very moment
    /// may still arrive: receivers treat a fired timer as "look again".
    pub fn cancel(&self) {
        let mut inner = self.timer.state().inner.lock();
        if self.live.swap(0, Relaxed) != 0 {
            inner.stale += 1;
        }
    }
}

impl Drop for Alarm {
    fn drop(&mut self) {
        self.cancel();
    }
}

impl Inner {
    /// Moves the alarms due at `now` into `due` (earliest first), skipping
    /// replaced and cancelled deadlines. `due` is dropped outside the lock:
    /// an alarm dropped meanwhile leaves its target's last holder there.
    fn take_due(&mut self, now: Instant, due: &mut Vec<Arc<Fire>>) {
        while let Some(top) = self.heap.peek_mut() {
            if top.at > now {
                break;
            }
            let entry = PeekMut::pop(top);
            if !entry.is_live() {
                self.stale = self.stale.saturating_sub(1);
                continue;
            }
            entry.live.store(0, Relaxed);
            // Live: its alarm is not dropped yet (dropping disarms it under
            // this lock first), so this succeeds.
            due.extend(entry.fire.upgrade());
        }
    }

    fn compact_if_mostly_stale(&mut self) {
        if self.stale > COMPACT_AFTER && self.stale * 2 > self.heap.len() {
            self.heap.retain(Entry::is_live);
            self.stale = 0;
        }
    }
}

impl Entry {
    fn is_live(&self) -> bool {
        self.live.load(Relaxed) == self.arm
    }
}

/// The timer thread: sends what is due, then sleeps until the earliest
/// deadline or until woken (a new earliest deadline, shutdown).
fn run(state: &State) {
    let mut due = Vec::new();
    let mut inner = state.inner.lock();
    while !inner.shutdown {
        inner.take_due(Instant::now(), &mut due);
        if due.is_empty() {
            match inner.heap.peek().map(|e| e.at) {
                Some(at) => {
                    state.wake.wait_until(&mut inner, at);
                }
                None => state.wake.wait(&mut inner),
            }
            continue;
        }
        MutexGuard::unlocked(&mut inner, || {
            for fire in due.drain(..) {
                if catch_unwind(AssertUnwindSafe(|| fire())).is_err() {
                    tracing::error!("a timer's target panicked");
                }
            }
        });
    }
}

impl Ord for Entry {
    /// Reversed, so the heap's top is the earliest deadline (the first armed
    /// among equal ones).
    fn cmp(&self, other: &Entry) -> Ordering {
        other.at.cmp(&self.at).then(other.arm.cmp(&self.arm))
    }
}

impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Entry) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Entry {
    fn eq(&self, other: &Entry) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Entry {}

#[cfg(test)]
mod tests;
