//! The timer thread against recording targets. Every check is an order or a
//! "not before its deadline"; none bounds how late a timer may be (a loaded
//! machine delays threads). [`HANG`] only turns a timer that never fires
//! into a failure instead of a hung test.

use std::time::Duration;

use crossbeam_channel::{Receiver, unbounded};

use super::*;
use crate::mailbox::{Actor, Mailbox};

/// Far longer than any timer here is set for: only a broken timer waits it out.
const HANG: Duration = Duration::from_secs(30);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A target that records each message with the instant it arrived.
fn recorder<M: Send + 'static>() -> (Sender<M>, Receiver<(M, Instant)>) {
    let (tx, rx) = unbounded();
    let target = Sender::from_fn(move |m| {
        let _ = tx.send((m, Instant::now()));
    });
    (target, rx)
}

fn next<M>(fired: &Receiver<(M, Instant)>) -> (M, Instant) {
    fired.recv_timeout(HANG).expect("a timer fired")
}

#[test]
fn alarms_fire_in_deadline_order_and_never_before_their_deadline() {
    let timer = Timer::new().unwrap();
    let (target, fired) = recorder();
    let offsets = [30, 10, 20, 0, 15];
    let alarms: Vec<Alarm> = offsets.iter().map(|&o| timer.alarm(target.clone(), o)).collect();
    let t0 = Instant::now();
    // Armed out of order.
    for (alarm, &o) in alarms.iter().zip(&offsets) {
        alarm.arm(t0 + ms(o));
    }
    let got: Vec<(u64, Instant)> = offsets.iter().map(|_| next(&fired)).collect();
    let order: Vec<u64> = got.iter().map(|&(o, _)| o).collect();
    assert_eq!(order, [0, 10, 15, 20, 30]);
    for (o, arrived) in got {
        assert!(arrived >= t0 + ms(o), "the {o} ms alarm fired before its deadline");
    }
}

#[test]
fn an_earlier_deadline_supersedes_a_later_one_and_a_later_one_replaces_an_earlier_one() {
    let timer = Timer::new().unwrap();
    let (target, fired) = recorder();
    let alarm = timer.alarm(target.clone(), "alarm");
    let sentinel = timer.alarm(target, "sentinel");

    let t0 = Instant::now();
    alarm.arm(t0 + Duration::from_secs(3600));
    alarm.arm(t0 + ms(10));
    let (message, arrived) = next(&fired);
    assert_eq!(message, "alarm");
    assert!(arrived >= t0 + ms(10));

    // The replaced deadline is far enough ahead that it cannot come up
    // before it is replaced, however the test thread is scheduled.
    let t1 = Instant::now();
    alarm.arm(t1 + ms(200));
    alarm.arm(t1 + ms(300));
    sentinel.arm(t1 + ms(350));
    let (message, arrived) = next(&fired);
    assert_eq!(message, "alarm");
    assert!(arrived >= t1 + ms(300), "it fired at the deadline it replaced");
    // Had the replaced arming fired too, it would come before this.
    assert_eq!(next(&fired).0, "sentinel", "each alarm fired once");
}

#[test]
fn a_cancelled_or_dropped_alarm_does_not_fire_and_a_cancelled_one_can_be_armed_again() {
    let timer = Timer::new().unwrap();
    let (target, fired) = recorder();
    let cancelled = timer.alarm(target.clone(), "cancelled");
    let dropped = timer.alarm(target.clone(), "dropped");
    let sentinel = timer.alarm(target, "sentinel");
    // Far enough ahead that they cannot come up before they are disarmed.
    let t0 = Instant::now();
    cancelled.arm(t0 + ms(200));
    dropped.arm(t0 + ms(200));
    cancelled.cancel();
    drop(dropped);
    sentinel.arm(t0 + ms(250));
    assert_eq!(next(&fired).0, "sentinel");

    cancelled.arm(Instant::now());
    assert_eq!(next(&fired).0, "cancelled");
    assert!(fired.is_empty());
}

#[test]
fn many_alarms_armed_and_re_armed_from_several_threads_each_fire_once_not_before_their_deadline() {
    const THREADS: usize = 4;
    const PER_THREAD: usize = 250;
    let timer = Timer::new().unwrap();
    let (target, fired) = recorder::<usize>();
    // Each alarm: (the alarm, its replaced deadline, its deadline).
    let armed: Vec<(Alarm, Instant, Instant)> = std::thread::scope(|s| {
        let threads: Vec<_> = (0..THREADS)
            .map(|t| {
                let (timer, target) = (&timer, &target);
                s.spawn(move || {
                    let mut rng = 0x9E37_79B9_7F4A_7C15_u64 ^ t as u64;
                    let mut jitter = move || {
                        rng = rng.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                        ms((rng >> 33) % 40)
                    };
                    (0..PER_THREAD)
                        .map(|i| {
                            let id = t * PER_THREAD + i;
                            let alarm = timer.alarm(target.clone(), id);
                            // Armed twice: the first deadline is far enough
                            // ahead that it cannot come up before it is
                            // replaced, by an earlier one (even ids) or a
                            // later one (odd ids). It must never fire.
                            let replaced = Instant::now() + ms(200) + jitter();
                            alarm.arm(replaced);
                            let later = if id.is_multiple_of(2) { ms(0) } else { ms(300) };
                            let at = Instant::now() + later + jitter();
                            alarm.arm(at);
                            (alarm, replaced, at)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        threads.into_iter().flat_map(|t| t.join().unwrap()).collect()
    });
    let mut seen = vec![false; armed.len()];
    for _ in 0..armed.len() {
        let (id, arrived) = next(&fired);
        assert!(!seen[id], "alarm {id} fired twice");
        seen[id] = true;
        assert!(arrived >= armed[id].2, "alarm {id} fired before its deadline");
    }
    // After every deadline, replaced ones included: nothing else may arrive
    // first.
    let last = armed.iter().map(|&(_, replaced, at)| replaced.max(at)).max().unwrap();
    let sentinel = timer.alarm(target, usize::MAX);
    sentinel.arm(last + ms(10));
    assert_eq!(next(&fired).0, usize::MAX);
}

#[test]
fn re_arming_one_alarm_over_and_over_keeps_the_heap_small() {
    let timer = Timer::new().unwrap();
    let (target, _fired) = recorder();
    let alarm = timer.alarm(target, ());
    let far = Instant::now() + Duration::from_secs(3600);
    for i in 0..10_000 {
        alarm.arm(far - ms(i));
    }
    let len = timer.state().inner.lock().heap.len();
    assert!(len <= 2 * COMPACT_AFTER + 2, "{len} entries for one alarm");
}

/// An actor that does nothing (a target that went away).
struct Nothing;

impl Actor for Nothing {
    type Message = ();
    fn handle(&mut self, (): ()) {}
}

#[test]
fn a_target_whose_receiver_is_gone_or_that_panics_does_not_stop_the_thread() {
    let timer = Timer::new().unwrap();
    // A channel whose receiver is gone, sent to as a careless target would.
    let (tx, rx) = unbounded::<()>();
    drop(rx);
    let panics = timer.alarm(Sender::from_fn(move |()| tx.send(()).expect("receiver gone")), ());
    // An actor dropped since: its weak sender drops the message.
    let mailbox = Mailbox::new(Nothing);
    let gone = timer.alarm(mailbox.weak_sender(), ());
    drop(mailbox);
    let (target, fired) = recorder();
    let alive = timer.alarm(target, "alive");

    let t0 = Instant::now();
    panics.arm(t0);
    gone.arm(t0);
    alive.arm(t0 + ms(10));
    assert_eq!(next(&fired).0, "alive");
    panics.arm(Instant::now());
    alive.arm(Instant::now() + ms(5));
    assert_eq!(next(&fired).0, "alive", "the thread went on after the panic");
}

#[test]
fn the_thread_runs_while_an_alarm_holds_it_and_ends_when_nothing_does() {
    let (timer, thread) = Timer::start().unwrap();
    let (target, fired) = recorder();
    let alarm = timer.alarm(target, 7);
    drop(timer);
    alarm.arm(Instant::now() + ms(5));
    assert_eq!(next(&fired).0, 7, "an alarm keeps its thread running");
    // Still armed when dropped: the thread does not wait for it.
    alarm.arm(Instant::now() + Duration::from_secs(3600));
    drop(alarm);
    let (ended_tx, ended) = unbounded();
    std::thread::spawn(move || {
        thread.join().unwrap();
        let _ = ended_tx.send(());
    });
    ended.recv_timeout(HANG).expect("the timer thread ended");
}

#[test]
fn the_shared_timer_is_one_thread_while_it_is_held() {
    let a = Timer::shared().unwrap();
    let b = Timer::shared().unwrap();
    assert!(Arc::ptr_eq(&a.owner, &b.owner));
}

/// Re-arms its own alarm from its handler until it has ticked three times.
struct Ticker {
    alarm: Option<Alarm>,
    ticks: usize,
    done: crossbeam_channel::Sender<(usize, Option<String>)>,
}

impl Actor for Ticker {
    type Message = ();
    fn handle(&mut self, (): ()) {
        self.ticks += 1;
        if self.ticks < 3 {
            let alarm = self.alarm.as_ref().expect("set before it was armed");
            alarm.arm(Instant::now() + ms(1));
        } else {
            let thread = std::thread::current().name().map(str::to_owned);
            let _ = self.done.send((self.ticks, thread));
        }
    }
}

#[test]
fn a_mailbox_actor_runs_on_the_timer_thread_and_re_arms_its_alarm_from_its_handler() {
    let timer = Timer::new().unwrap();
    let (done, ticked) = unbounded();
    let mailbox = Mailbox::new(Ticker {
        alarm: None,
        ticks: 0,
        done,
    });
    let alarm = timer.alarm(mailbox.weak_sender(), ());
    mailbox.with(|ticker| {
        alarm.arm(Instant::now());
        ticker.alarm = Some(alarm);
    });
    let (ticks, thread) = ticked.recv_timeout(HANG).expect("three ticks");
    assert_eq!(ticks, 3);
    assert_eq!(thread.as_deref(), Some("tokitai-timer"));
}

/// Arms its alarm when dropped.
struct ArmOnDrop(Arc<Alarm>);

impl Drop for ArmOnDrop {
    fn drop(&mut self) {
        self.0.arm(Instant::now());
    }
}

#[test]
fn a_target_dropped_on_the_timer_thread_may_arm_the_same_timer_as_it_goes() {
    let timer = Timer::new().unwrap();
    let (target, fired) = recorder();
    let after = Arc::new(timer.alarm(target, "after"));
    // The alarm's own slot: its target empties it as it fires, so the timer
    // thread lets go of the target's last holder, whose drop arms `after`.
    let slot: Arc<Mutex<Option<Alarm>>> = Arc::default();
    let guard = ArmOnDrop(Arc::clone(&after));
    let own_slot = Arc::clone(&slot);
    let own = timer.alarm(
        Sender::from_fn(move |()| {
            let _held_until_dropped = &guard;
            own_slot.lock().take();
        }),
        (),
    );
    slot.lock().insert(own).arm(Instant::now());
    assert_eq!(next(&fired).0, "after");
    assert!(slot.lock().is_none());
}
