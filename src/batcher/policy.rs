//! The batching policy as plain functions: admission, when to dispatch, which
//! worker, and which rows go in a batch. The batcher actor only wires these to
//! messages and timers, so every rule here is unit-tested without an actor.
//!
//! Priority levels (Triton's rule, 1 the highest): which level a request is
//! at ([`resolve_level`]), admission against its own level's queue limit,
//! and which level's front request rides next in a batch ([`next_level`]:
//! the highest first, each level capped at its `max_batch_rows`, a request
//! queued `max_priority_wait` taken as level 1). The queues themselves are
//! [`super::levels::LevelQueues`].
//! Owns: these rules. Must not touch: messages, timers, metrics.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::job::{Batch, Job, Slice};

/// Batching settings (from `[batching]`).
#[derive(Debug, Clone, PartialEq)]
pub struct BatchPolicy {
    pub max_batch_rows: usize,
    pub max_queue_delay: Duration,
    /// Share of the last batch's compute time a freed worker may wait for the
    /// clients it just answered to send again (0 disables regrouping).
    pub regroup_fraction: f64,
    /// Each priority level's limits, level 1 first (never empty; one entry:
    /// one queue, today's behaviour).
    pub levels: Vec<LevelLimits>,
    /// The level of a request that names none (1-based).
    pub default_level: u32,
    /// A request queued this long is taken as level 1 (zero: never).
    pub max_priority_wait: Duration,
}

/// One priority level's limits (`[batching.levels.N]`, globals filled in).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LevelLimits {
    /// Most rows queued at this level; past it its requests are refused.
    pub max_queue_rows: usize,
    /// Most rows of this level in one batch.
    pub max_batch_rows: usize,
    /// The level's default request timeout (`None`: the server's).
    pub timeout: Option<Duration>,
}

impl BatchPolicy {
    /// One level with these limits and no promotion: the policy before
    /// priority levels (tests and one-level versions).
    pub fn one_level(max_batch_rows: usize, max_queue_delay: Duration, max_queue_rows: usize, regroup: f64) -> Self {
        BatchPolicy {
            max_batch_rows,
            max_queue_delay,
            regroup_fraction: regroup,
            levels: vec![LevelLimits {
                max_queue_rows,
                max_batch_rows,
                timeout: None,
            }],
            default_level: 1,
            max_priority_wait: Duration::ZERO,
        }
    }

    /// Level `level`'s limits (a level out of range is clamped to the
    /// nearest one; [`resolve_level`] never makes one).
    pub fn level(&self, level: u32) -> &LevelLimits {
        &self.levels[level_index(level, self.levels.len())]
    }

    /// The level a request asking for `requested` is queued at.
    pub fn resolve(&self, requested: u64) -> u32 {
        resolve_level(requested, self.levels.len(), self.default_level)
    }

    /// Whether a busy worker may be handed a prepared batch (see
    /// [`pick_worker`]): only with one level, since a prepared batch of a low
    /// level is one more batch a higher level's request would wait behind.
    pub fn prepares_ahead(&self) -> bool {
        self.levels.len() == 1
    }
}

/// The 0-based queue index of 1-based `level` among `n_levels` (clamped).
pub fn level_index(level: u32, n_levels: usize) -> usize {
    (level.max(1) as usize - 1).min(n_levels.saturating_sub(1))
}

/// Triton's rule: a request naming 0 (none) or a level past `n_levels` is at
/// `default_level`; otherwise at the level it names (1 the highest).
pub fn resolve_level(requested: u64, n_levels: usize, default_level: u32) -> u32 {
    match u32::try_from(requested) {
        Ok(level) if level >= 1 && (level as usize) <= n_levels => level,
        _ => default_level,
    }
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

/// Admission: a request is queued only if all its rows fit in its level's
/// queue (`level_rows` rows queued at its level now, against that level's
/// `max_queue_rows`; other levels do not count). `Err` carries the level's
/// current depth for the 429 message. Nothing is queued on `Err`.
pub fn admit(level_rows: usize, request_rows: usize, limits: &LevelLimits) -> Result<(), usize> {
    if level_rows + request_rows > limits.max_queue_rows {
        Err(level_rows)
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
/// sizes under closed-loop load for a gain of one message hop. Never when
/// `prepare_ahead` is off (several priority levels: a prepared low-level
/// batch would be a second batch a higher level waits behind).
pub fn pick_worker(
    in_flight: &[usize],
    queued_rows: usize,
    max_batch_rows: usize,
    prepare_ahead: bool,
) -> Option<usize> {
    let (id, &load) = in_flight.iter().enumerate().min_by_key(|&(id, &n)| (n, id))?;
    match load {
        0 => Some(id),
        1 if prepare_ahead && queued_rows >= max_batch_rows => Some(id),
        _ => None,
    }
}

/// Takes up to `max_rows` rows from the front of the queue, in order,
/// splitting the last request if it does not fit. The batch's `n_rows` is
/// the number of rows taken off the queue.
pub fn take_batch(queue: &mut VecDeque<Queued>, max_rows: usize) -> Batch {
    let mut batch = Batch {
        slices: Vec::new(),
        n_rows: 0,
    };
    while batch.n_rows < max_rows {
        if take_front(queue, max_rows - batch.n_rows, &mut batch) == 0 {
            break;
        }
    }
    batch
}

/// Moves up to `room` rows of the request at the front of `queue` into
/// `batch` (popping it once all its rows are out); returns the rows moved
/// (0: the queue is empty or `room` is 0).
pub fn take_front(queue: &mut VecDeque<Queued>, room: usize, batch: &mut Batch) -> usize {
    let Some(front) = queue.front_mut() else { return 0 };
    let take = front.rows_left().min(room);
    if take == 0 {
        return 0;
    }
    batch.slices.push(Slice {
        job: Arc::clone(&front.job),
        first_row: front.next_row,
        n_rows: take,
    });
    front.next_row += take;
    batch.n_rows += take;
    if front.rows_left() == 0 {
        queue.pop_front();
    }
    take
}

/// Which level's front request goes next into a batch being filled.
/// `fronts[i]` is level `i + 1`'s front request's submission instant, or
/// `None` when that level is empty or already has its `max_batch_rows` in
/// the batch. A front submitted at or before `promote_before` (now minus
/// `max_priority_wait`; `None`: never promoted) counts as level 1. Level 1
/// and promoted fronts go first, oldest first (ties: the higher level);
/// then the highest remaining level. Returns a 0-based index.
pub fn next_level(fronts: &[Option<Instant>], promote_before: Option<Instant>) -> Option<usize> {
    let promoted = |i: usize, at: Instant| i == 0 || promote_before.is_some_and(|t| at <= t);
    let first_class = fronts
        .iter()
        .enumerate()
        .filter_map(|(i, f)| f.filter(|&at| promoted(i, at)).map(|at| (at, i)))
        .min();
    first_class
        .map(|(_, i)| i)
        .or_else(|| fronts.iter().position(Option::is_some))
}

/// The class a level's front request rides in: 0 for level 1 and promoted
/// requests (submitted at or before `promote_before`), else its own level
/// index. A batch carries one class: a lower level's rows never ride beside
/// a higher level's, where they would lengthen its compute (a live row in a
/// 33-row Tiny batch computes for 11 ms instead of 5; BENCHMARKS).
pub fn class_of(level: usize, submitted_at: Instant, promote_before: Option<Instant>) -> usize {
    if level == 0 || promote_before.is_some_and(|t| submitted_at <= t) {
        0
    } else {
        level
    }
}

/// The instant at or before which a queued request counts as level 1, for
/// `max_priority_wait` (zero: never, `None`).
pub fn promote_before(now: Instant, max_priority_wait: Duration) -> Option<Instant> {
    if max_priority_wait.is_zero() {
        return None;
    }
    now.checked_sub(max_priority_wait)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(delay_us: u64) -> BatchPolicy {
        BatchPolicy::one_level(8, Duration::from_micros(delay_us), 20, 0.1)
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
        let l = p.level(1);
        assert_eq!(admit(0, 20, l), Ok(()));
        assert_eq!(admit(10, 10, l), Ok(()));
        assert_eq!(admit(10, 11, l), Err(10));
        assert_eq!(admit(20, 1, l), Err(20));
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
            ..p.clone()
        };
        assert_eq!(regroup(3, 4, compute, t0, &off), None);
    }

    #[test]
    fn idle_workers_first_and_prepared_batches_only_when_full() {
        assert_eq!(pick_worker(&[1, 0, 0], 1, 8, true), Some(1));
        assert_eq!(pick_worker(&[1, 1], 3, 8, true), None);
        assert_eq!(pick_worker(&[1, 1], 8, 8, true), Some(0));
        assert_eq!(pick_worker(&[2, 1], 8, 8, true), Some(1));
        assert_eq!(pick_worker(&[2, 2], 100, 8, true), None);
        assert_eq!(pick_worker(&[], 1, 8, true), None);
        // Several levels: an idle worker only, never a prepared batch.
        assert_eq!(pick_worker(&[1, 0], 100, 8, false), Some(1));
        assert_eq!(pick_worker(&[1, 1], 100, 8, false), None);
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

    fn levels(n: usize) -> BatchPolicy {
        let mut p = policy(0);
        p.levels = (1..=n)
            .map(|i| LevelLimits {
                max_queue_rows: 10 * i,
                max_batch_rows: 8 / i,
                timeout: (i == 2).then(|| Duration::from_secs(60)),
            })
            .collect();
        p.default_level = 2;
        p
    }

    #[test]
    fn a_request_is_at_the_level_it_names_else_the_default() {
        let p = levels(3);
        assert_eq!((p.resolve(1), p.resolve(2), p.resolve(3)), (1, 2, 3));
        // 0 names none; a level past the last is the default (Triton).
        assert_eq!((p.resolve(0), p.resolve(4), p.resolve(u64::MAX)), (2, 2, 2));
        assert_eq!(policy(0).resolve(7), 1, "one level: every request at 1");
        assert_eq!(p.level(2).timeout, Some(Duration::from_secs(60)));
        assert_eq!((level_index(0, 3), level_index(9, 3)), (0, 2), "clamped");
    }

    #[test]
    fn admission_is_per_level() {
        let p = levels(2);
        // Level 2 (limit 20) full; level 1 (limit 10) still admits.
        assert_eq!(admit(20, 1, p.level(2)), Err(20));
        assert_eq!(admit(0, 10, p.level(1)), Ok(()));
        assert_eq!(admit(5, 6, p.level(1)), Err(5));
        assert!(!p.prepares_ahead() && policy(0).prepares_ahead());
    }

    #[test]
    fn the_highest_level_goes_first_and_promotion_is_by_submit_time() {
        let t0 = Instant::now();
        let at = |ms: u64| Some(t0 + Duration::from_millis(ms));
        // Level 2 older than level 1: still level 1 first without promotion.
        assert_eq!(next_level(&[at(5), at(1)], None), Some(0));
        assert_eq!(next_level(&[None, at(1), at(0)], None), Some(1));
        assert_eq!(next_level(&[None, None], None), None);
        // Level 2's front waited long enough: it counts as level 1, and the
        // older of the two goes first.
        assert_eq!(next_level(&[at(5), at(1)], at(2)), Some(1));
        assert_eq!(next_level(&[at(0), at(1)], at(2)), Some(0));
        // Two promoted lower levels: by submit time, not by level.
        assert_eq!(next_level(&[None, at(3), at(2)], at(4)), Some(2));
        // Same instant: the higher level.
        assert_eq!(next_level(&[None, at(2), at(2)], at(4)), Some(1));
        // Not yet promoted: the highest remaining level.
        assert_eq!(next_level(&[None, at(3), at(2)], at(1)), Some(1));
        assert_eq!(promote_before(t0, Duration::ZERO), None, "0: never promoted");
        let wait = Duration::from_millis(1);
        assert_eq!(promote_before(t0 + wait, wait), Some(t0));
    }

    #[test]
    fn retry_after_is_bounded() {
        assert_eq!(retry_after_secs(100, 0.0), 1);
        assert_eq!(retry_after_secs(100, 1000.0), 1);
        assert_eq!(retry_after_secs(5000, 1000.0), 5);
        assert_eq!(retry_after_secs(10_000_000, 1.0), 60);
    }
}
