//! Loom models of a call lane: the production slot state machine and sleep announcements
//! ([`Slot`], [`Sleep`]) run on loom's atomics in ordinary memory, a caller thread against
//! the instance's lane thread, under every interleaving loom explores (bounded preemptions).
//! The rings of the lane socket are modelled as one counter per direction and a futex: a
//! sleeper notes the count before it announces its sleep and waits until it moves, as a
//! `poll(2)` on the socket returns once a byte is there.
//!
//! What a run checks: no lost wake-up (waits have no timeout, so a lost ring is a deadlock
//! loom reports); the request and reply bytes are handed over with a happens-before edge each
//! time (loom `UnsafeCell`s); a call is either withdrawn or taken (or bounced), never both;
//! every reply is the one to its call and the slot ends free.
use super::{Sleep, Slot, SlotState};
use crate::mailbox::model::{expect_model_failure, CellBuf, ModelFutex, NoFence};
use crate::mailbox::words::{Futex, Word32};
use loom::sync::atomic::AtomicU32;
use loom::sync::Arc;
use std::sync::atomic::Ordering;

/// What the instance does with a posted call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Instance {
    /// Takes and answers it.
    Answers,
    /// Gives it back unstarted (it drains).
    Bounces,
}

/// One slot of a lane, its header words, and the socket between the two sides.
#[derive(Debug)]
struct Lane<W> {
    state: W,
    req_len: W,
    rep_len: W,
    req: CellBuf,
    rep: CellBuf,
    server_sleeping: W,
    caller_sleepers: W,
    /// Rings written by the caller (read by the instance), and the other way.
    to_instance: AtomicU32,
    to_caller: AtomicU32,
    futex: ModelFutex,
}

impl<W: Word32> Lane<W> {
    fn new(w: impl Fn() -> W) -> Self {
        Lane {
            state: w(),
            req_len: w(),
            rep_len: w(),
            req: CellBuf::new(),
            rep: CellBuf::new(),
            server_sleeping: w(),
            caller_sleepers: w(),
            to_instance: AtomicU32::new(0),
            to_caller: AtomicU32::new(0),
            futex: ModelFutex::new(),
        }
    }

    fn slot(&self) -> Slot<'_, W, &CellBuf> {
        Slot {
            state: &self.state,
            req_len: &self.req_len,
            rep_len: &self.rep_len,
            req: &self.req,
            rep: &self.rep,
        }
    }

    fn sleep(&self) -> Sleep<'_, W> {
        Sleep {
            server_sleeping: &self.server_sleeping,
            caller_sleepers: &self.caller_sleepers,
        }
    }

    fn ring(&self, to: &AtomicU32) {
        to.fetch_add(1, Ordering::SeqCst);
        self.futex.wake(to, 1);
    }

    /// The caller, as `CallerLane::call` runs it: post, ring if the instance sleeps, then
    /// (with `withdraw`, its deadline passing at once) try to take the call back; else, or if
    /// too late, sleep until the slot settles. Returns whether the call was withdrawn.
    fn caller(&self, call: u8, withdraw: bool) -> bool {
        let (slot, sleep) = (self.slot(), self.sleep());
        assert!(slot.post(&[call; 2]), "call {call}: the slot is free");
        if sleep.server_sleeps() {
            self.ring(&self.to_instance);
        }
        if withdraw && slot.withdraw() {
            return true;
        }
        let mut out = Vec::new();
        loop {
            match slot.state() {
                SlotState::Done => {
                    assert_eq!(slot.reply(&mut out, true), Ok(true));
                    assert_eq!(out, [call + 100; 3], "the reply to call {call}");
                    return false;
                }
                SlotState::Bounced => {
                    assert!(slot.reset());
                    return false;
                }
                SlotState::Posted | SlotState::Taken => {}
                other => panic!("call {call}: the slot went {other:?}"),
            }
            // Sleep: note the socket, announce, look once more, then wait for a ring.
            let seen = self.to_caller.load(Ordering::SeqCst);
            sleep.caller_sleeping(true);
            if matches!(slot.state(), SlotState::Posted | SlotState::Taken) {
                self.futex.wait(&self.to_caller, seen);
            }
            sleep.caller_sleeping(false);
        }
    }

    /// One sweep of the lane thread over the slot: whether it started (or bounced) a call.
    fn sweep(&self, what: Instance, buf: &mut Vec<u8>) -> bool {
        let (slot, sleep) = (self.slot(), self.sleep());
        if slot.state() != SlotState::Posted {
            return false;
        }
        let worked = match what {
            Instance::Answers => {
                if !slot.take(buf).expect("an honest length") {
                    return false; // withdrawn meanwhile
                }
                let call = buf[0];
                assert_eq!(buf, &[call; 2], "call {call} arrived whole");
                slot.complete(&[call + 100; 3])
            }
            Instance::Bounces => slot.bounce(),
        };
        if worked && sleep.callers_sleep() {
            self.ring(&self.to_caller);
        }
        worked
    }

    /// The lane thread, as `LaneLoop::run` runs it, until it has served `calls` calls (or,
    /// with `once`, after one sweep, as if it then stopped).
    fn instance(&self, what: Instance, calls: u32, once: bool) -> u32 {
        let sleep = self.sleep();
        let (mut served, mut buf) = (0, Vec::new());
        while served < calls {
            if self.sweep(what, &mut buf) {
                served += 1;
                continue;
            }
            if once {
                break;
            }
            // Sleep: note the socket, announce, sweep once more, then wait for a ring.
            let seen = self.to_instance.load(Ordering::SeqCst);
            sleep.set_server_sleeping(true);
            let worked = self.sweep(what, &mut buf);
            if !worked {
                self.futex.wait(&self.to_instance, seen);
            }
            sleep.set_server_sleeping(false);
            served += u32::from(worked);
        }
        served
    }
}

fn model(preemptions: usize, f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(preemptions);
    b.check(f);
}

/// `calls` calls answered one after the other through one slot.
fn calls<W: Word32 + Send + Sync + 'static>(word: fn() -> W, calls: u32, preemptions: usize) {
    model(preemptions, move || {
        let lane = Arc::new(Lane::new(word));
        let l = lane.clone();
        let caller = loom::thread::spawn(move || {
            for call in 0..calls {
                assert!(!l.caller(call as u8, false));
            }
        });
        assert_eq!(lane.instance(Instance::Answers, calls, false), calls);
        caller.join().unwrap();
        assert_eq!(lane.slot().state(), SlotState::Free);
    });
}

/// Calls answered one after the other through one slot, each side free to sleep at any
/// point: no wake-up is lost, every reply is its call's, the slot ends free.
#[test]
fn calls_are_answered_and_no_wake_up_is_lost() {
    calls(|| AtomicU32::new(0), 1, 3);
    calls(|| AtomicU32::new(0), 2, 2);
}

/// A caller whose deadline passes races the instance taking (or bouncing) the call: exactly
/// one of them wins, a taken call is still answered, and the slot ends free.
#[test]
fn a_call_is_withdrawn_or_taken_never_both() {
    for what in [Instance::Answers, Instance::Bounces] {
        model(3, move || {
            let lane = Arc::new(Lane::new(|| AtomicU32::new(0)));
            let l = lane.clone();
            let caller = loom::thread::spawn(move || l.caller(7, true));
            let started = lane.instance(what, 1, true);
            let withdrawn = caller.join().unwrap();
            assert!(
                withdrawn != (started == 1),
                "{what:?}: withdrawn {withdrawn}, started {started}"
            );
            assert_eq!(lane.slot().state(), SlotState::Free);
        });
    }
}

/// The lane without its fences: loom finds a ring that is never sent.
#[test]
fn without_the_fences_a_ring_is_lost() {
    expect_model_failure(module_path!(), "without_the_fences_a_ring_is_lost", || {
        calls(|| NoFence(AtomicU32::new(0)), 1, 3)
    });
}
