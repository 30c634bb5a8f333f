//! The batcher's queues: one FIFO per priority level, and the row counts
//! admission and dispatch read.
//!
//! Owns: where a request waits ([`LevelQueues::push`] by its `Job::priority`),
//! the rows queued per level and in all, taking a batch across the levels in
//! the order [`policy::next_level`] gives (each level capped at its
//! `max_batch_rows`), and removing dead requests (client left, deadline
//! passed) from every level. With one level it is the single queue of
//! before, taken by the same [`policy::take_batch`]. Must not touch:
//! messages, timers, workers, metrics (the batcher reads the counts here and
//! records them).

use std::collections::VecDeque;
use std::time::Instant;

use super::job::Batch;
use super::policy::{self, BatchPolicy, Queued};
use crate::config::MAX_PRIORITY_LEVELS;
use crate::metrics::DropCounters;

/// One queue per priority level (index 0 is level 1).
pub struct LevelQueues {
    queues: Vec<VecDeque<Queued>>,
    /// Rows not yet handed out, per level.
    rows: Vec<usize>,
    /// Their sum.
    total: usize,
}

impl LevelQueues {
    /// Empty queues for `n_levels` levels (at least one).
    pub fn new(n_levels: usize) -> LevelQueues {
        let n = n_levels.clamp(1, MAX_PRIORITY_LEVELS);
        LevelQueues {
            queues: (0..n).map(|_| VecDeque::new()).collect(),
            rows: vec![0; n],
            total: 0,
        }
    }

    fn index(&self, level: u32) -> usize {
        policy::level_index(level, self.queues.len())
    }

    /// Rows queued in all.
    pub fn total_rows(&self) -> usize {
        self.total
    }

    /// Rows queued at `level` (1-based).
    pub fn level_rows(&self, level: u32) -> usize {
        self.rows[self.index(level)]
    }

    /// Rows queued per level, level 1 first.
    pub fn rows_by_level(&self) -> &[usize] {
        &self.rows
    }

    /// Queues `queued` at the back of its job's level.
    pub fn push(&mut self, queued: Queued) {
        let i = self.index(queued.job.priority);
        let rows = queued.rows_left();
        self.rows[i] += rows;
        self.total += rows;
        self.queues[i].push_back(queued);
    }

    /// Whether `job` is still queued at the back of its level (it was just
    /// pushed and not dispatched).
    pub fn is_last(&self, job: &std::sync::Arc<super::job::Job>) -> bool {
        self.queues[self.index(job.priority)]
            .back()
            .is_some_and(|q| std::sync::Arc::ptr_eq(&q.job, job))
    }

    /// When the oldest front request was submitted (for the queue delay).
    pub fn oldest(&self) -> Option<Instant> {
        self.queues
            .iter()
            .filter_map(|q| q.front())
            .map(|q| q.job.submitted_at)
            .min()
    }

    /// The earliest deadline of any queued request.
    pub fn earliest_deadline(&self) -> Option<Instant> {
        self.queues.iter().flatten().map(|q| q.job.deadline).min()
    }

    /// Drops dead requests at each level's front, so they neither take
    /// batch slots nor delay the ones behind them.
    pub fn drop_dead_fronts(&mut self, now: Instant, dropped: &DropCounters) {
        for (queue, level_rows) in self.queues.iter_mut().zip(&mut self.rows) {
            while let Some(front) = queue.front() {
                let rows = front.rows_left();
                if !front.job.drop_if_dead(now, rows, dropped) {
                    break;
                }
                queue.pop_front();
                *level_rows -= rows;
                self.total -= rows;
            }
        }
    }

    /// Drops every dead request, wherever it is queued (the expiry timer).
    pub fn drop_dead(&mut self, now: Instant, dropped: &DropCounters) {
        for (queue, level_rows) in self.queues.iter_mut().zip(&mut self.rows) {
            queue.retain(|queued| {
                let rows = queued.rows_left();
                let dead = queued.job.drop_if_dead(now, rows, dropped);
                if dead {
                    *level_rows -= rows;
                    self.total -= rows;
                }
                !dead
            });
        }
    }

    /// Empties every level (retirement), oldest level first.
    pub fn drain(&mut self) -> impl Iterator<Item = Queued> + '_ {
        self.rows.iter_mut().for_each(|r| *r = 0);
        self.total = 0;
        self.queues.iter_mut().flat_map(|q| q.drain(..))
    }

    /// Takes the next batch: up to `policy.max_batch_rows` rows, the highest
    /// level first (promoted requests with level 1, by submit time), at most
    /// each level's own `max_batch_rows` of each level, and of one class
    /// only ([`policy::class_of`]): rows of a lower level wait for a batch
    /// of their own rather than lengthen a higher level's.
    pub fn take_batch(&mut self, policy: &BatchPolicy, now: Instant) -> Batch {
        if self.queues.len() == 1 {
            let cap = policy.max_batch_rows.min(policy.levels[0].max_batch_rows);
            let batch = policy::take_batch(&mut self.queues[0], cap);
            self.rows[0] -= batch.n_rows;
            self.total -= batch.n_rows;
            return batch;
        }
        let promote_before = policy::promote_before(now, policy.max_priority_wait);
        let mut taken = [0usize; MAX_PRIORITY_LEVELS];
        let mut batch = Batch {
            slices: Vec::new(),
            n_rows: 0,
        };
        let mut class = None;
        while batch.n_rows < policy.max_batch_rows {
            let mut fronts = [None; MAX_PRIORITY_LEVELS];
            for (i, queue) in self.queues.iter().enumerate() {
                let room = policy.levels[i].max_batch_rows > taken[i];
                let same_class = |at: &Instant| class.is_none_or(|c| policy::class_of(i, *at, promote_before) == c);
                fronts[i] = queue
                    .front()
                    .map(|q| q.job.submitted_at)
                    .filter(|at| room && same_class(at));
            }
            let Some(i) = policy::next_level(&fronts[..self.queues.len()], promote_before) else {
                break;
            };
            if let Some(at) = fronts[i] {
                class.get_or_insert(policy::class_of(i, at, promote_before));
            }
            let room = (policy.max_batch_rows - batch.n_rows).min(policy.levels[i].max_batch_rows - taken[i]);
            let rows = policy::take_front(&mut self.queues[i], room, &mut batch);
            taken[i] += rows;
            self.rows[i] -= rows;
            self.total -= rows;
        }
        batch
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::batcher::job::Job;
    use crate::batcher::policy::LevelLimits;

    /// A job of `n` rows at `level`, every value `id`.
    fn job(id: f32, n: usize, level: u32) -> Arc<Job> {
        let limits = crate::input::InputLimits {
            row_len: 1,
            max_rows: n,
        };
        let input = crate::input::InferInput::new(vec![id; n], &limits).unwrap();
        Job::new(input, Duration::from_secs(60), level).0
    }

    fn queued(job: &Arc<Job>) -> Queued {
        Queued {
            job: Arc::clone(job),
            next_row: 0,
        }
    }

    /// Two levels: batches of 8, level 2 at most 3 rows of one.
    fn two_levels(max_priority_wait: Duration) -> BatchPolicy {
        let mut p = BatchPolicy::one_level(8, Duration::ZERO, 100, 0.0);
        p.levels.push(LevelLimits {
            max_queue_rows: 100,
            max_batch_rows: 3,
            timeout: None,
        });
        p.max_priority_wait = max_priority_wait;
        p
    }

    /// A batch as [(job id, first row, rows)].
    fn parts(batch: &Batch) -> Vec<(f32, usize, usize)> {
        batch
            .slices
            .iter()
            .map(|s| (s.job.input.values()[0], s.first_row, s.n_rows))
            .collect()
    }

    #[test]
    fn one_level_is_the_single_fifo_queue() {
        let p = BatchPolicy::one_level(4, Duration::ZERO, 100, 0.0);
        let mut q = LevelQueues::new(1);
        // A request naming another level still waits in the one queue.
        let (a, b) = (job(1.0, 3, 1), job(2.0, 3, 2));
        q.push(queued(&a));
        q.push(queued(&b));
        assert_eq!((q.total_rows(), q.level_rows(1), q.level_rows(2)), (6, 6, 6));
        assert!(q.is_last(&b) && !q.is_last(&a));
        assert_eq!(parts(&q.take_batch(&p, Instant::now())), vec![(1.0, 0, 3), (2.0, 0, 1)]);
        assert_eq!(parts(&q.take_batch(&p, Instant::now())), vec![(2.0, 1, 2)]);
        assert_eq!((q.total_rows(), q.oldest()), (0, None));
    }

    #[test]
    fn batches_fill_from_the_highest_level_with_each_level_capped() {
        let p = two_levels(Duration::ZERO);
        let mut q = LevelQueues::new(2);
        // Bulk first, then live: live rides first all the same.
        let (bulk, live) = (job(2.0, 10, 2), job(1.0, 2, 1));
        q.push(queued(&bulk));
        q.push(queued(&live));
        assert_eq!(q.rows_by_level(), &[2, 10]);
        assert_eq!(q.oldest(), Some(bulk.submitted_at));
        // Live's batch carries no bulk rows (they would lengthen its
        // compute); level 2's batches stop at its cap, not at the batch's 8.
        assert_eq!(parts(&q.take_batch(&p, Instant::now())), vec![(1.0, 0, 2)]);
        assert_eq!(parts(&q.take_batch(&p, Instant::now())), vec![(2.0, 0, 3)]);
        assert_eq!(parts(&q.take_batch(&p, Instant::now())), vec![(2.0, 3, 3)]);
        assert_eq!(q.rows_by_level(), &[0, 4]);
        // Level 1 may fill the whole batch.
        let big = job(3.0, 9, 1);
        q.push(queued(&big));
        assert_eq!(parts(&q.take_batch(&p, Instant::now())), vec![(3.0, 0, 8)]);
        assert_eq!(parts(&q.take_batch(&p, Instant::now())), vec![(3.0, 8, 1)]);
        assert_eq!(parts(&q.take_batch(&p, Instant::now())), vec![(2.0, 6, 3)]);
        assert_eq!(q.total_rows(), 1);
    }

    #[test]
    fn a_request_waiting_past_max_priority_wait_rides_as_level_one_by_age() {
        let wait = Duration::from_millis(50);
        let p = two_levels(wait);
        let mut q = LevelQueues::new(2);
        let old_bulk = job(2.0, 2, 2);
        let live = job(1.0, 1, 1);
        q.push(queued(&old_bulk));
        q.push(queued(&live));
        // Not yet promoted: live first, alone.
        let before = old_bulk.submitted_at + wait / 2;
        assert_eq!(parts(&q.take_batch(&p, before)), vec![(1.0, 0, 1)]);
        assert_eq!(parts(&q.take_batch(&p, before)), vec![(2.0, 0, 2)]);
        // Promoted: the older bulk request goes ahead of a newer live one,
        // in the same batch (a promoted request rides with level 1).
        let (old_bulk, live) = (job(2.0, 2, 2), job(1.0, 1, 1));
        q.push(queued(&old_bulk));
        q.push(queued(&live));
        let after = old_bulk.submitted_at + wait;
        assert_eq!(parts(&q.take_batch(&p, after)), vec![(2.0, 0, 2), (1.0, 0, 1)]);
    }

    #[test]
    fn dead_requests_are_dropped_from_every_level() {
        let m = Arc::new(crate::metrics::Metrics::new());
        let shape = crate::metrics::VersionShape {
            model: "m".into(),
            version: 1,
            workers: 1,
            experts: 1,
            max_queue_rows: 100,
            max_batch_rows: 8,
        };
        let dropped = crate::metrics::VersionMetrics::new(&m, shape).drop_counters();
        let mut q = LevelQueues::new(3);
        let limits = crate::input::InputLimits {
            row_len: 1,
            max_rows: 4,
        };
        let mut replies = Vec::new();
        let mut jobs = Vec::new();
        for (level, rows) in [(1, 1), (2, 2), (3, 4), (3, 1)] {
            let input = crate::input::InferInput::new(vec![0.0; rows], &limits).unwrap();
            let (j, reply) = Job::new(input, Duration::from_secs(60), level);
            q.push(queued(&j));
            jobs.push(j);
            replies.push(reply);
        }
        assert_eq!(q.earliest_deadline(), Some(jobs[0].deadline));
        // Level 2's and level 3's first client leave: fronts dropped.
        drop(replies.remove(1));
        drop(replies.remove(1));
        q.drop_dead_fronts(Instant::now(), &dropped);
        assert_eq!(q.rows_by_level(), &[1, 0, 1]);
        // The last client leaves: dropped wherever it is.
        drop(replies.pop());
        q.drop_dead(Instant::now(), &dropped);
        assert_eq!((q.rows_by_level(), q.total_rows()), (&[1, 0, 0][..], 1));
        assert_eq!(q.drain().count(), 1);
        assert_eq!(q.total_rows(), 0);
    }
}
