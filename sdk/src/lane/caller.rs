//! The caller's side of call lanes: a [`CallerLane`] per instance connection, posting calls
//! into free slots and waiting for their results (polling briefly, then ringing and sleeping),
//! and the [`LaneSet`] of a caller's lanes. A call the instance never took goes through the
//! proxy instead; a taken call whose lane closes fails. A caller opens a lane by presenting
//! the key the proxy handed it; an object result keeps its slot done (a [`SlotHold`]) until
//! the caller has viewed it, which is how the instance learns it may delete the object.
use super::{lock, poll_step, CONNECT_TIMEOUT, HELLO_LEN, HELLO_MAGIC, KEY_MAGIC};
use crate::Error;
use bytes::BytesMut;
use shoal_protocol::{CallerFrame, ErrorCode, FrameDecoder, LaneInfo, Payload, WireError};
use shoal_shm::{LaneGauge, LaneRegion, ShmError, SlotState};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// How a lane call ended.
pub(crate) enum LaneOutcome {
    /// The instance answered (or the call failed after it started); an object result comes
    /// with its slot, held until dropped.
    Answered(Result<Payload, WireError>, Option<SlotHold>),
    /// The call never started; it may go through the proxy.
    NotStarted,
}

/// A done slot whose reply named an object: while it is held, the instance keeps the object;
/// dropping it frees the slot, and the instance then deletes the object.
pub(crate) struct SlotHold {
    lane: Arc<CallerLane>,
    slot: u32,
}

impl Drop for SlotHold {
    fn drop(&mut self) {
        self.lane.region.reset(self.slot);
        self.lane.set_slot(self.slot, SlotUse::Free);
    }
}

/// What [`CallerLane::settle`] found in a slot whose call is over.
enum Settled {
    Answered(Result<Payload, WireError>),
    /// A reply naming an object; the slot stays done until released.
    Object(Result<Payload, WireError>),
    NotStarted,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotUse {
    Free,
    Busy,
    /// Its call timed out after the instance took it: free again once the reply lands.
    Abandoned,
}

/// One caller connection's lane to one local instance.
#[derive(Debug)]
pub(crate) struct CallerLane {
    pub(crate) instance_id: String,
    /// The socket it was handed out on.
    pub(crate) path: String,
    region: LaneRegion,
    gauge: LaneGauge,
    stream: Arc<tokio::net::UnixStream>,
    slots: Mutex<Vec<SlotUse>>,
    in_flight: AtomicUsize,
    dead: Arc<AtomicBool>,
    rung: Arc<Notify>,
    reader: tokio::task::JoinHandle<()>,
    decoder: FrameDecoder,
}

impl Drop for CallerLane {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

fn would_block(e: &ShmError) -> bool {
    matches!(e, ShmError::FdPass(nix::errno::Errno::EAGAIN))
}

impl CallerLane {
    /// Connects to an instance's lane socket and maps what it hands out.
    pub(crate) async fn connect(info: &LaneInfo) -> Result<CallerLane, Error> {
        tokio::time::timeout(CONNECT_TIMEOUT, Self::open(info))
            .await
            .map_err(|_| Error::protocol("the instance did not hand out a lane in time"))?
    }

    async fn open(info: &LaneInfo) -> Result<CallerLane, Error> {
        use tokio::io::AsyncWriteExt;
        let mut stream = tokio::net::UnixStream::connect(&info.path).await?;
        let mut key = [0u8; HELLO_LEN];
        key[..8].copy_from_slice(KEY_MAGIC);
        key[8..].copy_from_slice(&info.key);
        stream.write_all(&key).await?;
        let mut hello = [0u8; HELLO_LEN];
        let (n, mut fds) = loop {
            stream.readable().await?;
            match shoal_shm::recv_with_fds(stream.as_fd(), &mut hello, 2) {
                Ok(r) => break r,
                Err(e) if would_block(&e) => continue,
                Err(e) => return Err(e.into()),
            }
        };
        if n != HELLO_LEN || &hello[..8] != HELLO_MAGIC || fds.len() != 2 {
            return Err(Error::protocol("malformed lane hello"));
        }
        let slots = u32::from_le_bytes(hello[8..12].try_into().unwrap_or_default());
        let cap = u64::from_le_bytes(hello[12..20].try_into().unwrap_or_default());
        let gauge_fd = fds.pop().ok_or_else(|| Error::protocol("no gauge fd"))?;
        let region_fd = fds.pop().ok_or_else(|| Error::protocol("no lane fd"))?;
        let region = LaneRegion::open(region_fd, slots, cap)?;
        let gauge = LaneGauge::open(gauge_fd)?;
        let stream = Arc::new(stream);
        let dead = Arc::new(AtomicBool::new(false));
        let rung = Arc::new(Notify::new());
        let reader = tokio::spawn(read_rings(stream.clone(), dead.clone(), rung.clone()));
        Ok(CallerLane {
            instance_id: info.instance_id.clone(),
            path: info.path.clone(),
            slots: Mutex::new(vec![SlotUse::Free; slots as usize]),
            region,
            gauge,
            stream,
            in_flight: AtomicUsize::new(0),
            dead,
            rung,
            reader,
            decoder: FrameDecoder::new(cap as usize),
        })
    }

    pub(crate) fn is_dead(&self) -> bool {
        self.dead.load(Ordering::SeqCst)
    }

    /// Calls in flight through this lane.
    pub(crate) fn load(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Whether a call posted now would start at once (a free slot, and room in the instance).
    pub(crate) fn has_room(&self) -> bool {
        !self.is_dead()
            && self.gauge.has_room()
            && lock(&self.slots).iter().any(|s| *s != SlotUse::Busy)
    }

    fn claim_slot(&self) -> Option<u32> {
        let mut slots = lock(&self.slots);
        for (i, s) in slots.iter_mut().enumerate() {
            let i = i as u32;
            match *s {
                SlotUse::Free => {}
                SlotUse::Abandoned if self.region.reset(i) => {}
                _ => continue,
            }
            *s = SlotUse::Busy;
            return Some(i);
        }
        None
    }

    fn set_slot(&self, slot: u32, to: SlotUse) {
        if let Some(s) = lock(&self.slots).get_mut(slot as usize) {
            *s = to;
        }
    }

    /// Posts `frame` (an encoded `Invoke`) and waits for its answer until `deadline`,
    /// polling for `spin` first when it is this lane's only call.
    pub(crate) async fn call(
        self: &Arc<Self>,
        frame: &[u8],
        deadline: tokio::time::Instant,
        spin: Duration,
    ) -> LaneOutcome {
        let Some(slot) = self.claim_slot() else {
            return LaneOutcome::NotStarted;
        };
        if !self.region.post(slot, frame) {
            self.set_slot(slot, SlotUse::Free);
            return LaneOutcome::NotStarted;
        }
        let alone = self.in_flight.fetch_add(1, Ordering::SeqCst) == 0;
        if self.region.server_sleeps() {
            let _ = self.stream.try_write(&[1]);
        }
        let out = self
            .wait(slot, deadline, if alone { spin } else { Duration::ZERO })
            .await;
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        match out {
            Settled::Answered(r) => LaneOutcome::Answered(r, None),
            Settled::Object(r) => LaneOutcome::Answered(
                r,
                Some(SlotHold {
                    lane: self.clone(),
                    slot,
                }),
            ),
            Settled::NotStarted => LaneOutcome::NotStarted,
        }
    }

    /// What `slot` holds now, if the call is over.
    fn settle(&self, slot: u32, timed_out: bool) -> Option<Settled> {
        match self.region.state(slot) {
            SlotState::Done => {
                let mut buf = Vec::new();
                // A reply length beyond the slot leaves `buf` empty: malformed, like garbage.
                let _ = self.region.peek_reply(slot, &mut buf);
                let mut b = BytesMut::from(&buf[..]);
                let result = match self.decoder.decode::<CallerFrame>(&mut b) {
                    Ok(Some(CallerFrame::Result { result, .. })) => result,
                    _ => {
                        self.dead.store(true, Ordering::SeqCst);
                        Err(WireError::new(
                            ErrorCode::ProtocolError,
                            "malformed reply on the call lane",
                        ))
                    }
                };
                if matches!(result, Ok(Payload::Object(_))) {
                    return Some(Settled::Object(result));
                }
                self.region.reset(slot);
                self.set_slot(slot, SlotUse::Free);
                Some(Settled::Answered(result))
            }
            SlotState::Bounced => {
                self.region.reset(slot);
                self.set_slot(slot, SlotUse::Free);
                Some(Settled::NotStarted)
            }
            SlotState::Posted if timed_out || self.is_dead() => {
                if self.region.withdraw(slot) {
                    self.set_slot(slot, SlotUse::Free);
                    return Some(if timed_out {
                        Settled::Answered(Err(timeout_error()))
                    } else {
                        Settled::NotStarted
                    });
                }
                None // taken meanwhile: look again
            }
            SlotState::Taken if timed_out || self.is_dead() => {
                self.set_slot(slot, SlotUse::Abandoned);
                Some(Settled::Answered(Err(if timed_out {
                    timeout_error()
                } else {
                    WireError::new(
                        ErrorCode::InstanceFailed,
                        "the instance closed its call lane mid-call",
                    )
                })))
            }
            SlotState::Posted | SlotState::Taken => None,
            SlotState::Free | SlotState::Invalid(_) => {
                self.dead.store(true, Ordering::SeqCst);
                self.set_slot(slot, SlotUse::Abandoned);
                Some(Settled::Answered(Err(WireError::new(
                    ErrorCode::InstanceFailed,
                    "the call lane was corrupted",
                ))))
            }
        }
    }

    async fn wait(&self, slot: u32, deadline: tokio::time::Instant, spin: Duration) -> Settled {
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            let timed_out = tokio::time::Instant::now() >= deadline;
            if let Some(out) = self.settle(slot, timed_out) {
                return out;
            }
            if timed_out {
                continue; // taken meanwhile: settle again
            }
            if start.elapsed() < spin {
                poll_step(&mut spins, 16);
                continue;
            }
            let rung = self.rung.notified();
            tokio::pin!(rung);
            rung.as_mut().enable();
            self.region.caller_sleeping(true);
            if matches!(
                self.region.state(slot),
                SlotState::Posted | SlotState::Taken
            ) && !self.is_dead()
            {
                let _ = tokio::time::timeout_at(deadline, rung).await;
            }
            self.region.caller_sleeping(false);
        }
    }
}

fn timeout_error() -> WireError {
    WireError::new(
        ErrorCode::Timeout,
        "no answer from the instance by the deadline",
    )
}

/// Reads rings off a lane's socket and wakes the waiting calls; marks the lane dead at EOF.
async fn read_rings(stream: Arc<tokio::net::UnixStream>, dead: Arc<AtomicBool>, rung: Arc<Notify>) {
    let mut buf = [0u8; 256];
    loop {
        if stream.readable().await.is_err() {
            break;
        }
        match stream.try_read(&mut buf) {
            Ok(0) => break,
            Ok(_) => rung.notify_waiters(),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => break,
        }
    }
    dead.store(true, Ordering::SeqCst);
    rung.notify_waiters();
}

/// A caller's lanes to the local instances of one function.
#[derive(Debug)]
pub(crate) struct LaneSet {
    pub(crate) lanes: Vec<Arc<CallerLane>>,
    pub(crate) checked: Instant,
}

impl LaneSet {
    /// The lane a call should take: to `instance` if named, with room, least busy first.
    pub(crate) fn pick(&self, instance: Option<&str>, turn: usize) -> Option<Arc<CallerLane>> {
        let n = self.lanes.len();
        (0..n)
            .map(|k| &self.lanes[(turn + k) % n])
            .filter(|l| instance.is_none_or(|i| l.instance_id == i))
            .filter(|l| l.has_room())
            .min_by_key(|l| l.load())
            .cloned()
    }
}
