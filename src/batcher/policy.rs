//! The batching policy as plain functions: admission, when to dispatch, which
//! worker, and which rows go in a batch. The batcher actor only wires these to
//! messages and timers, so every rule here is unit-tested without an actor.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::job::{Batch, Job, Slice};

/// Batching settings (from `[batching]`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchPolicy {
    pub max_batch_rows: usize,
    pub max_queue_delay: Duration,
    pub max_queue_rows: usize,
    /// Share of the last batch's compute time a freed worker may wait for the
    /// clients it just answered to send again (0 disables regrouping).
    pub regroup_fraction: f64,
}

/// A queued request and how many of its rows were already handed out.
pub struct Queued {
    pub job: Arc<Job>,
    pub next_row: usize,
}

impl Queued {
    pub fn rows_left(&self) -> usize {
        self.job.n_rows - self.next_row
    }
}

/// Admission: a request is queued only if all its rows fit. `Err` carries
/// the current depth for the 429 message. Nothing is queued on `Err`.
pub fn admit(queued_rows: usize, request_rows: usize, policy: &BatchPolicy) -> Result<(), usize> {
    if queued_rows + request_rows > policy.max_queue_rows {
        Err(queued_rows)
    } else {
        Ok(())
    }
}

/// `Retry-After` for a 429, in whole seconds: the time to drain the queue at
/// the observed rate, at least 1 s (and at most 60 s).
pub fn retry_after_secs(queued_rows: usize, rows_per_sec: f64) -> u64 {
    if rows_per_sec <= 0.0 {
        return 1;
    }
    ((queued_rows as f64 / rows_per_sec).ceil() as u64).clamp(1, 60)
}

/// What to do with the queue right now, for a worker that can take a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Form a batch now.
    Dispatch,
    /// Nothing would be gained by sending a partial batch yet: look again then.
    WaitUntil(Instant),
    /// Nothing is queued.
    Idle,
}

/// A short hold after a worker frees up (see [`regroup`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Regroup {
    /// Dispatch once this many rows are queued...
    pub rows: usize,
    /// ...or at this instant, whichever comes first.
    pub until: Instant,
}

/// When a worker finishes a batch of `done_rows` rows while only
/// `queued_rows` wait, the clients it just answered are likely to send again
/// within a round trip (a closed loop: the search service's pattern). Sending
/// the queued rows at once would leave those clients for the batch after,
/// and the load settles into alternating half-size batches (measured on Tiny
/// with 32 clients: 16-row batches, see BENCHMARKS.md). So the next partial
/// batch may wait until the answered rows are back, for at most
/// `regroup_fraction` of the batch's compute time. A lone client is never
/// held: its next request alone makes the expected count.
pub fn regroup(
    queued_rows: usize,
    done_rows: usize,
    compute: Duration,
    now: Instant,
    policy: &BatchPolicy,
) -> Option<Regroup> {
    let wait = compute.mul_f64(policy.regroup_fraction.clamp(0.0, 1.0));
    let rows = (queued_rows + done_rows).min(policy.max_batch_rows);
    (done_rows > 0 && !wait.is_zero() && queued_rows < rows).then(|| Regroup {
        rows,
        until: now + wait,
    })
}

/// Dispatch when rows are queued, unless a regroup hold is on (fewer rows
/// than it expects, before its deadline), or `max_queue_delay` is set and the
/// batch would not be full and its oldest request has waited less than that.
pub fn decide(
    queued_rows: usize,
    oldest_submitted: Option<Instant>,
    regroup: Option<Regroup>,
    now: Instant,
    policy: &BatchPolicy,
) -> Decision {
    let Some(oldest) = oldest_submitted else {
        return Decision::Idle;
    };
    if queued_rows == 0 {
        return Decision::Idle;
    }
    if let Some(hold) = regroup
        && queued_rows < hold.rows
        && now < hold.until
    {
        return Decision::WaitUntil(hold.until);
    }
    if policy.max_queue_delay.is_zero() || queued_rows >= policy.max_batch_rows {
        return Decision::Dispatch;
    }
    let release = oldest + policy.max_queue_delay;
    if now >= release {
        Decision::Dispatch
    } else {
        Decision::WaitUntil(release)
    }
}

/// Picks the worker for the next batch. An idle worker is always preferred
/// (lowest `in_flight`, then lowest id). A busy worker gets a second,
/// prepared batch only when a full batch is queued: preparing a partial batch
/// early would split the rows that would otherwise ride in it, halving batch
/// sizes under closed-loop load for a gain of one message hop.
pub fn pick_worker(in_flight: &[usize], queued_rows: usize, max_batch_rows: usize) -> Option<usize> {
    let (id, &load) = in_flight.iter().enumerate().min_by_key(|&(id, &n)| (n, id))?;
    match load {
        0 => Some(id),
        1 if queued_rows >= max_batch_rows => Some(id),
        _ => None,
    }
}

/// Takes up to `max_rows` rows from the front of the queue, in order,
/// splitting the last request if it does not fit. The batch's `n_rows` is
/// the number of rows taken off the queue.
pub fn take_batch(queue: &mut VecDeque<Queued>, max_rows: usize) -> Batch {
    let mut slices = Vec::new();
    let mut n_rows = 0;
    while n_rows < max_rows {
        let Some(front) = queue.front_mut() else { break };
        let take = front.rows_left().min(max_rows - n_rows);
        slices.push(Slice {
            job: Arc::clone(&front.job),
            first_row: front.next_row,
            n_rows: take,
        });
        front.next_row += take;
        n_rows += take;
        if front.rows_left() == 0 {
            queue.pop_front();
        }
    }
    Batch { slices, n_rows }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(delay_us: u64) -> BatchPolicy {
        BatchPolicy {
            max_batch_rows: 8,
            max_queue_delay: Duration::from_micros(delay_us),
            max_queue_rows: 20,
            regroup_fraction: 0.1,
        }
    }

    fn job(n: usize) -> Arc<Job> {
        let limits = crate::input::InputLimits {
            row_len: 1,
            max_rows: n,
        };
        let input = crate::input::InferInput::new(vec![0.0; n], &limits).unwrap();
        Job::new(input, Duration::from_secs(1), 1).0
    }

    #[test]
    fn admission_counts_all_rows_of_the_request() {
        let p = policy(0);
        assert_eq!(admit(0, 20, &p), Ok(()));
        assert_eq!(admit(10, 10, &p), Ok(()));
        assert_eq!(admit(10, 11, &p), Err(10));
        assert_eq!(admit(20, 1, &p), Err(20));
    }

    #[test]
    fn work_conserving_without_delay() {
        let now = Instant::now();
        assert_eq!(decide(1, Some(now), None, now, &policy(0)), Decision::Dispatch);
        assert_eq!(decide(0, None, None, now, &policy(0)), Decision::Idle);
    }

    #[test]
    fn delay_holds_partial_batches_until_full_or_old_enough() {
        let t0 = Instant::now();
        let p = policy(500);
        let release = t0 + Duration::from_micros(500);
        assert_eq!(decide(3, Some(t0), None, t0, &p), Decision::WaitUntil(release));
        assert_eq!(decide(8, Some(t0), None, t0, &p), Decision::Dispatch);
        assert_eq!(decide(3, Some(t0), None, release, &p), Decision::Dispatch);
    }

    #[test]
    fn regroup_holds_for_the_answered_rows_within_a_share_of_compute() {
        let t0 = Instant::now();
        let p = policy(0);
        let compute = Duration::from_millis(30);
        // Batch of 4 done, 3 queued: wait for up to 7 rows, at most 3 ms.
        let hold = regroup(3, 4, compute, t0, &p).unwrap();
        assert_eq!(
            hold,
            Regroup {
                rows: 7,
                until: t0 + Duration::from_millis(3)
            }
        );
        assert_eq!(decide(3, Some(t0), Some(hold), t0, &p), Decision::WaitUntil(hold.until));
        assert_eq!(decide(7, Some(t0), Some(hold), t0, &p), Decision::Dispatch);
        assert_eq!(decide(3, Some(t0), Some(hold), hold.until, &p), Decision::Dispatch);
        // Never more than a full batch is waited for.
        assert_eq!(regroup(6, 5, compute, t0, &p).unwrap().rows, 8);
        assert_eq!(regroup(8, 5, compute, t0, &p), None);
        // A lone client (nothing queued, one row answered): its next request
        // alone makes the expected count, so it is never held.
        let lone = regroup(0, 1, compute, t0, &p).unwrap();
        assert_eq!(decide(1, Some(t0), Some(lone), t0, &p), Decision::Dispatch);
        // Off when the fraction is 0.
        let off = BatchPolicy {
            regroup_fraction: 0.0,
            ..p
        };
        assert_eq!(regroup(3, 4, compute, t0, &off), None);
    }

    #[test]
    fn idle_workers_first_and_prepared_batches_only_when_full() {
        assert_eq!(pick_worker(&[1, 0, 0], 1, 8), Some(1));
        assert_eq!(pick_worker(&[1, 1], 3, 8), None);
        assert_eq!(pick_worker(&[1, 1], 8, 8), Some(0));
        assert_eq!(pick_worker(&[2, 1], 8, 8), Some(1));
        assert_eq!(pick_worker(&[2, 2], 100, 8), None);
        assert_eq!(pick_worker(&[], 1, 8), None);
    }

    #[test]
    fn batches_keep_order_and_split_large_requests() {
        let (a, b, c) = (job(3), job(12), job(2));
        let mut q: VecDeque<Queued> = [&a, &b, &c]
            .into_iter()
            .map(|j| Queued {
                job: Arc::clone(j),
                next_row: 0,
            })
            .collect();
        let first = take_batch(&mut q, 8);
        assert_eq!(first.n_rows, 8);
        let parts: Vec<(usize, usize)> = first.slices.iter().map(|s| (s.first_row, s.n_rows)).collect();
        assert_eq!(parts, vec![(0, 3), (0, 5)]);
        assert!(Arc::ptr_eq(&first.slices[1].job, &b));
        let second = take_batch(&mut q, 8);
        let parts: Vec<(usize, usize)> = second.slices.iter().map(|s| (s.first_row, s.n_rows)).collect();
        assert_eq!(parts, vec![(5, 7), (0, 1)]);
        let third = take_batch(&mut q, 8);
        assert_eq!((third.n_rows, third.slices[0].first_row), (1, 1));
        assert!(q.is_empty());
        assert_eq!(take_batch(&mut q, 8).n_rows, 0);
    }

    #[test]
    fn retry_after_is_bounded() {
        assert_eq!(retry_after_secs(100, 0.0), 1);
        assert_eq!(retry_after_secs(100, 1000.0), 1);
        assert_eq!(retry_after_secs(5000, 1000.0), 5);
        assert_eq!(retry_after_secs(10_000_000, 1.0), 60);
    }
}
