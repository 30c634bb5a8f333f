//! The batcher actor against fake workers: what it dispatches, in which
//! order, to whom, and what happens after a worker fails a batch. The fakes
//! record each batch and answer only when the test says so, so every step is
//! driven by messages, never by time (regrouping and queue delay are off),
//! except in the three tests where its timers fire (a deadline at level 1
//! and at level 2, the queue delay): those check only that a timer fired,
//! and not before its instant. The priority-level tests use two levels. No runtime is needed:
//! the batcher starts and runs from a plain thread.

use std::sync::Arc;
use std::sync::mpsc;
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::job::{Batch, Job, JobReply, RunBatch};
use super::policy::BatchPolicy;
use super::{AttachWorkers, BatchDone, Batcher, BatcherHandle, Message, WorkerExited, WorkerReplaced};
use crate::error::EngineError;
use crate::input::{InferInput, InputLimits};
use crate::mailbox::Sender;
use crate::metrics::{Metrics, VersionMetrics, VersionShape};
use crate::model::Dims;
use crate::readiness::Readiness;

const ROW_LEN: usize = 2;
const MAX_BATCH_ROWS: usize = 4;

/// A batch as [(job id, first row, rows)].
type Slices = Vec<(f32, usize, usize)>;

/// What a fake worker records of each batch it is sent: its id, the batch,
/// and the thread that handed it over.
type Sent = (usize, Batch, ThreadId);

/// A worker that records each batch it is sent.
fn fake_worker(id: usize, batches: &mpsc::Sender<Sent>) -> Sender<RunBatch> {
    let batches = parking_lot::Mutex::new(batches.clone());
    Sender::from_fn(move |RunBatch(batch)| {
        let _ = batches.lock().send((id, batch, std::thread::current().id()));
    })
}

struct Harness {
    batcher: BatcherHandle,
    batches: mpsc::Receiver<Sent>,
    /// Where the fake workers (and replacements) report their batches.
    tx: mpsc::Sender<Sent>,
    metrics: Arc<Metrics>,
}

impl Harness {
    fn start(n_workers: usize) -> Harness {
        Harness::with_delay(n_workers, Duration::ZERO)
    }

    /// A batcher with `max_queue_delay` set to `delay`.
    fn with_delay(n_workers: usize, delay: Duration) -> Harness {
        Harness::with_policy(n_workers, BatchPolicy::one_level(MAX_BATCH_ROWS, delay, 64, 0.0))
    }

    /// A batcher with `policy`.
    fn with_policy(n_workers: usize, policy: BatchPolicy) -> Harness {
        let metrics = Arc::new(Metrics::new());
        let shape = VersionShape {
            model: "m".into(),
            version: 1,
            workers: n_workers,
            experts: 1,
            max_queue_rows: 64,
            max_batch_rows: policy.max_batch_rows,
        };
        let capacity: Vec<usize> = policy.levels.iter().map(|l| l.max_queue_rows).collect();
        let version = VersionMetrics::with_levels(&metrics, shape, &capacity);
        let batcher =
            Batcher::start(policy, version, Arc::new(Readiness::new(n_workers))).expect("the timer thread starts");
        let (tx, batches) = mpsc::channel();
        let workers = (0..n_workers).map(|id| fake_worker(id, &tx)).collect();
        batcher.send(Message::AttachWorkers(AttachWorkers { workers }));
        Harness {
            batcher,
            batches,
            tx,
            metrics,
        }
    }

    /// Submits a job of `n_rows` rows whose every value is `id`. The batcher
    /// handles it before this returns (nothing else runs it meanwhile).
    fn submit(&self, id: f32, n_rows: usize) -> (Arc<Job>, oneshot::Receiver<JobReply>) {
        self.submit_with_timeout(id, n_rows, Duration::from_secs(600))
    }

    fn submit_with_timeout(
        &self,
        id: f32,
        n_rows: usize,
        timeout: Duration,
    ) -> (Arc<Job>, oneshot::Receiver<JobReply>) {
        self.submit_full(id, n_rows, timeout, 1)
    }

    /// Submits a job at priority `level`.
    fn submit_at(&self, id: f32, n_rows: usize, level: u32) -> (Arc<Job>, oneshot::Receiver<JobReply>) {
        self.submit_full(id, n_rows, Duration::from_secs(600), level)
    }

    fn submit_full(
        &self,
        id: f32,
        n_rows: usize,
        timeout: Duration,
        level: u32,
    ) -> (Arc<Job>, oneshot::Receiver<JobReply>) {
        let limits = InputLimits {
            row_len: ROW_LEN,
            max_rows: 64,
        };
        let input = InferInput::new(vec![id; n_rows * ROW_LEN], &limits).unwrap();
        let (job, reply) = Job::new(input, timeout, level);
        self.batcher.submit(Arc::clone(&job));
        (job, reply)
    }

    fn done(&self, worker: usize, n_rows: usize) {
        self.batcher.batch_done().send(done(worker, n_rows));
    }

    /// Every batch dispatched so far, as (worker, [(job id, first row, rows)]).
    fn dispatched(&mut self) -> Vec<(usize, Slices)> {
        let mut out = Vec::new();
        while let Ok((worker, batch, _)) = self.batches.try_recv() {
            out.push((worker, slices(&batch)));
        }
        out
    }
}

fn done(worker: usize, n_rows: usize) -> BatchDone {
    BatchDone {
        worker,
        n_rows,
        compute: Duration::from_micros(10),
    }
}

fn slices(batch: &Batch) -> Slices {
    batch
        .slices
        .iter()
        .map(|s| (s.job.input.values()[0], s.first_row, s.n_rows))
        .collect()
}

fn answer(job: &Job, first_row: usize, n_rows: usize) {
    let dims = Dims {
        input: ROW_LEN,
        hidden: 1,
        output: 1,
        experts: 1,
        top_k: 1,
        depth: 1,
    };
    job.complete_rows(
        &dims,
        first_row,
        &vec![0.5; n_rows],
        &vec![1.0; n_rows],
        Duration::ZERO,
        n_rows,
    );
}

#[test]
fn one_batch_per_free_worker_in_arrival_order() {
    let mut h = Harness::start(2);
    let (a, _ra) = h.submit(1.0, 1);
    let (_b, _rb) = h.submit(2.0, 2);
    // Both workers idle: one batch each, in arrival order.
    assert_eq!(h.dispatched(), vec![(0, vec![(1.0, 0, 1)]), (1, vec![(2.0, 0, 2)])]);
    // Both busy and less than a full batch queued: nothing is prepared.
    let (_c, _rc) = h.submit(3.0, 1);
    let (_d, _rd) = h.submit(4.0, 1);
    assert_eq!(h.dispatched(), vec![]);
    // Worker 0 frees up: the queued requests ride together, in order.
    answer(&a, 0, 1);
    h.done(0, 1);
    assert_eq!(h.dispatched(), vec![(0, vec![(3.0, 0, 1), (4.0, 0, 1)])]);
}

#[test]
fn a_full_batch_is_prepared_for_a_busy_worker_and_large_requests_split() {
    let mut h = Harness::start(1);
    let (_a, _ra) = h.submit(1.0, 1);
    assert_eq!(h.dispatched(), vec![(0, vec![(1.0, 0, 1)])]);
    // Six rows queued behind a busy worker: one full batch goes ahead
    // (split at the batch limit), the rest waits.
    let (_b, _rb) = h.submit(2.0, 6);
    assert_eq!(h.dispatched(), vec![(0, vec![(2.0, 0, 4)])]);
    h.done(0, 1);
    assert_eq!(h.dispatched(), vec![], "the worker still has a batch");
    h.done(0, 4);
    assert_eq!(h.dispatched(), vec![(0, vec![(2.0, 4, 2)])]);
}

#[test]
fn a_failed_batch_fails_its_requests_and_drops_their_remaining_rows() {
    let mut h = Harness::start(1);
    let (a, ra) = h.submit(1.0, 6);
    let (_b, _rb) = h.submit(2.0, 1);
    assert_eq!(h.dispatched(), vec![(0, vec![(1.0, 0, 4)])]);
    // The worker fails the first part of request 1.
    a.fail(EngineError::Internal("injected".into()));
    h.done(0, 4);
    // Its last two rows are dropped, not computed; request 2 goes next.
    assert_eq!(h.dispatched(), vec![(0, vec![(2.0, 0, 1)])]);
    assert!(matches!(ra.blocking_recv().unwrap(), Err(EngineError::Internal(_))));
    let text = String::from_utf8(h.metrics.render()).unwrap();
    assert!(
        text.contains("tokitai_rows_dropped_total{model=\"m\",reason=\"failed\",version=\"1\"} 2"),
        "{text}"
    );
}

#[test]
fn an_exited_worker_gets_no_batches_until_it_is_replaced() {
    let mut h = Harness::start(2);
    let (_a, _ra) = h.submit(1.0, 1);
    assert_eq!(h.dispatched(), vec![(0, vec![(1.0, 0, 1)])]);
    // Worker 0 ends with its batch in hand: the next request goes to 1.
    h.batcher.worker_exited().send(WorkerExited { worker: 0 });
    let (_b, _rb) = h.submit(2.0, 1);
    assert_eq!(h.dispatched(), vec![(1, vec![(2.0, 0, 1)])]);
    // The pool's replacement takes its place (the fakes report themselves
    // as their id, so it shows up as 0) and is idle. The restart count is
    // the pool's (served/pool.rs tests).
    let sender = fake_worker(0, &h.tx);
    h.batcher
        .send(Message::WorkerReplaced(WorkerReplaced { worker: 0, sender }));
    let (_c, _rc) = h.submit(3.0, 1);
    assert_eq!(h.dispatched(), vec![(0, vec![(3.0, 0, 1)])]);
}

#[test]
fn a_worker_reporting_done_takes_the_next_batch_on_its_own_thread_and_a_submit_dispatches_on_its() {
    let h = Harness::start(1);
    let (_a, _ra) = h.submit(1.0, 1);
    let (_, _, submitter) = h.batches.try_recv().expect("dispatched at once");
    assert_eq!(
        submitter,
        std::thread::current().id(),
        "the submitting thread dispatched it"
    );
    let (_b, _rb) = h.submit(2.0, 1);
    assert!(h.batches.try_recv().is_err(), "the only worker is busy");
    // The worker reports from its own thread: the next batch is handed
    // over right there, not by another thread woken for it.
    let report = h.batcher.batch_done();
    let worker_thread = std::thread::spawn(move || {
        report.send(done(0, 1));
        std::thread::current().id()
    })
    .join()
    .unwrap();
    let (worker, batch, handed_over_on) = h.batches.try_recv().expect("the next batch");
    assert_eq!((worker, slices(&batch)), (0, vec![(2.0, 0, 1)]));
    assert_eq!(handed_over_on, worker_thread);
}

#[test]
fn only_a_request_left_queued_arms_the_expiry_timer() {
    let h = Harness::start(1);
    let (_a, _ra) = h.submit(1.0, 1);
    assert_eq!(h.batcher.armed_timers(), (None, None), "dispatched at once: no timer");
    let (b, _rb) = h.submit(2.0, 1);
    assert_eq!(
        h.batcher.armed_timers(),
        (None, Some(b.deadline)),
        "left queued: its deadline"
    );
    let (_c, _rc) = h.submit(3.0, 1);
    assert_eq!(
        h.batcher.armed_timers(),
        (None, Some(b.deadline)),
        "a later deadline re-arms nothing"
    );
}

/// Far longer than any timer here is set for: only a broken timer waits it out.
const HANG: Duration = Duration::from_secs(30);

/// The reply on `reply`, waited for at most [`HANG`].
fn reply_or_hang(reply: oneshot::Receiver<JobReply>) -> JobReply {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(reply.blocking_recv());
    });
    rx.recv_timeout(HANG).expect("an answer").expect("the job answered")
}

#[test]
fn a_request_left_queued_past_its_deadline_is_failed_by_the_expiry_timer() {
    let mut h = Harness::start(1);
    // The only worker takes this one and never reports: nothing but the
    // expiry timer can answer the next.
    let (_a, _ra) = h.submit(1.0, 1);
    let (b, rb) = h.submit_with_timeout(2.0, 1, Duration::from_millis(20));
    let answer = reply_or_hang(rb);
    assert!(Instant::now() >= b.deadline, "failed before its deadline");
    assert!(
        matches!(answer, Err(EngineError::DeadlineExceeded { .. })),
        "{answer:?}"
    );
    // It was queued, not computed.
    assert_eq!(h.dispatched().len(), 1);
    assert_eq!(h.batcher.armed_timers(), (None, None), "nothing left to expire");
}

#[test]
fn a_partial_batch_held_for_the_queue_delay_goes_when_the_delay_timer_fires() {
    // Long enough that the submission cannot outlast it, however the test
    // thread is scheduled.
    let delay = Duration::from_millis(100);
    let h = Harness::with_delay(1, delay);
    // One row of a four-row batch, with the worker idle: held for the delay.
    let (a, _ra) = h.submit(1.0, 1);
    let (worker, batch, handed_over_on) = h.batches.recv_timeout(HANG).expect("released by the delay timer");
    assert!(Instant::now() >= a.submitted_at + delay, "released before the delay");
    assert_eq!((worker, slices(&batch)), (0, vec![(1.0, 0, 1)]));
    assert_ne!(
        handed_over_on,
        std::thread::current().id(),
        "the submission held it; the timer thread dispatched it"
    );
}

/// Two levels, no promotion: batches of 4 rows, level 2 at most 2 rows of
/// one and at most 6 rows queued.
fn two_levels() -> BatchPolicy {
    let mut policy = BatchPolicy::one_level(MAX_BATCH_ROWS, Duration::ZERO, 64, 0.0);
    policy.levels.push(super::policy::LevelLimits {
        max_queue_rows: 6,
        max_batch_rows: 2,
        timeout: None,
    });
    policy
}

#[test]
fn a_higher_level_request_overtakes_the_queued_lower_level_ones() {
    let mut h = Harness::with_policy(1, two_levels());
    let (_a, _ra) = h.submit_at(1.0, 2, 2);
    assert_eq!(h.dispatched(), vec![(0, vec![(1.0, 0, 2)])]);
    // Level 2 queues up behind the busy worker; nothing is prepared for it
    // (several levels), even with a full batch's worth queued.
    let (_b, _rb) = h.submit_at(2.0, 2, 2);
    let (_c, _rc) = h.submit_at(3.0, 2, 2);
    assert_eq!(h.dispatched(), vec![]);
    // A level-1 request arrives last and rides first, alone: level 2's
    // rows would lengthen its compute.
    let (_d, _rd) = h.submit_at(4.0, 1, 1);
    h.done(0, 2);
    assert_eq!(h.dispatched(), vec![(0, vec![(4.0, 0, 1)])]);
    h.done(0, 1);
    assert_eq!(h.dispatched(), vec![(0, vec![(2.0, 0, 2)])]);
    h.done(0, 2);
    assert_eq!(h.dispatched(), vec![(0, vec![(3.0, 0, 2)])]);
}

#[test]
fn a_full_level_is_refused_while_another_is_admitted() {
    let mut h = Harness::with_policy(1, two_levels());
    let (_a, _ra) = h.submit_at(1.0, 1, 2);
    let held: Vec<_> = (0..3).map(|i| h.submit_at(2.0 + i as f32, 2, 2)).collect();
    assert_eq!(h.dispatched().len(), 1);
    // Level 2 holds its 6 rows: one more is refused at once...
    let (_x, rx) = h.submit_at(9.0, 1, 2);
    match rx.blocking_recv().unwrap() {
        Err(EngineError::Overloaded { queued_rows, limit, .. }) => assert_eq!((queued_rows, limit), (6, 6)),
        other => panic!("expected Overloaded, got {:?}", other.map(|_| ())),
    }
    // ...while level 1 is still admitted.
    let (_y, _ry) = h.submit_at(10.0, 4, 1);
    h.done(0, 1);
    assert_eq!(h.dispatched(), vec![(0, vec![(10.0, 0, 4)])]);
    let text = String::from_utf8(h.metrics.render()).unwrap();
    for line in [
        "tokitai_queue_rejections_total{model=\"m\",priority=\"2\",version=\"1\"} 1",
        "tokitai_queue_rejections_total{model=\"m\",priority=\"1\",version=\"1\"} 0",
        "tokitai_queue_depth_rows{model=\"m\",priority=\"2\",version=\"1\"} 6",
        "tokitai_queue_depth_rows{model=\"m\",priority=\"1\",version=\"1\"} 0",
    ] {
        assert!(text.contains(line), "missing {line} in\n{text}");
    }
    drop(held);
}

#[test]
fn retiring_fails_what_is_queued_at_every_level() {
    let h = Harness::with_policy(1, two_levels());
    let (_a, _ra) = h.submit_at(1.0, 1, 1);
    let (_b, rb) = h.submit_at(2.0, 1, 2);
    let (_c, rc) = h.submit_at(3.0, 1, 1);
    h.batcher.send(Message::Retire);
    for reply in [rb, rc] {
        assert!(matches!(reply.blocking_recv().unwrap(), Err(EngineError::NotReady(_))));
    }
}

#[test]
fn a_lower_level_request_past_its_deadline_is_failed_by_the_expiry_timer() {
    let h = Harness::with_policy(1, two_levels());
    let (_a, _ra) = h.submit_at(1.0, 1, 1);
    let (b, rb) = h.submit_full(2.0, 1, Duration::from_millis(20), 2);
    assert_eq!(h.batcher.armed_timers(), (None, Some(b.deadline)));
    let answer = reply_or_hang(rb);
    assert!(Instant::now() >= b.deadline, "failed before its deadline");
    assert!(
        matches!(answer, Err(EngineError::DeadlineExceeded { .. })),
        "{answer:?}"
    );
    assert_eq!(h.batcher.armed_timers(), (None, None), "nothing left to expire");
}
