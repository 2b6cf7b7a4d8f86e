//! A subscription's queue of frames on their way to its client, counted in
//! bytes: against the subscription's own room
//! ([`defaults::SUBSCRIPTION_QUEUE_BYTES`]) and against the replica's
//! subscription memory budget, from when a frame is queued until the gRPC
//! stream has taken it and asked for the next one (by then HTTP/2 has it,
//! within its own bounded send buffer, which the subscription's allowance
//! covers).
//!
//! Followers queue frames in two ways. Live events are offered with
//! [`Outbox::push`], which refuses (`Full`) rather than wait when the room
//! is used up: the follower drops them and catches up from the store later,
//! so nothing is held for a reader that does not read. Catch-up pages are
//! read only after [`Outbox::reserve`] found room for them.
//!
//! The budget may end the subscription ([`Evict`]) to make room for others:
//! its frames are dropped at once, whether or not its client ever reads
//! again, and the stream ends with UNAVAILABLE telling it to resubscribe
//! from its checkpoint. Other endings (failure, shutdown, a subscription
//! gone quiet) deliver the frames already queued first.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use futures_util::Stream;
use prost::Message;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::defaults;
use crate::fanout::budget::{Account, Budget, Evict, Exhausted, Grant};
use crate::log::ids::SubscriberId;
use crate::proto::hub::v1 as pb;
use crate::telemetry;

/// What became of a frame offered with [`Outbox::push`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pushed {
    /// Queued for the client.
    Queued,
    /// The subscription's room is used up: nothing was queued.
    Full,
    /// The subscription has ended: nothing was queued.
    Ended,
}

/// One subscription's frames.
pub(crate) struct Outbox {
    subscriber: SubscriberId,
    state: Mutex<State>,
    /// Woken when room frees up.
    room: Notify,
    account: Account,
    /// Cancelled when the subscription ended, for whatever reason: its
    /// driver and followers stop.
    ended: CancellationToken,
    /// Cancelled when the client's stream was dropped.
    gone: CancellationToken,
}

struct State {
    frames: VecDeque<(pb::SubscribeResponse, Grant)>,
    /// Room in use: queued frames and open reservations.
    queued: usize,
    /// The frame the stream handed over last; released at the next poll.
    in_flight: Option<Grant>,
    end: End,
    waker: Option<Waker>,
    /// When the client last took a frame (or frames began to wait).
    last_taken: Instant,
    /// When the last frame was queued.
    last_queued: Instant,
}

enum End {
    Open,
    /// Ended; this status follows the frames still queued.
    Failed(tonic::Status),
    /// Ended; the stream finishes after the frames still queued.
    Finished,
}

impl Outbox {
    /// An outbox drawing on `budget`.
    pub(crate) fn new(budget: &Budget, subscriber: SubscriberId) -> Arc<Outbox> {
        Arc::new_cyclic(|me: &Weak<Outbox>| {
            let evict: Weak<dyn Evict> = me.clone();
            let now = Instant::now();
            Outbox {
                subscriber,
                state: Mutex::new(State {
                    frames: VecDeque::new(),
                    queued: 0,
                    in_flight: None,
                    end: End::Open,
                    waker: None,
                    last_taken: now,
                    last_queued: now,
                }),
                room: Notify::new(),
                account: budget.account(Some(evict)),
                ended: CancellationToken::new(),
                gone: CancellationToken::new(),
            }
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A fixed allowance from the budget, held as long as the grant is.
    pub(crate) fn allowance(&self, bytes: usize) -> Result<Grant, Exhausted> {
        self.account.allowance(bytes)
    }

    /// Resolves when the subscription has ended.
    pub(crate) async fn ended(&self) {
        self.ended.cancelled().await;
    }

    /// Resolves when the client's stream is gone.
    pub(crate) async fn gone(&self) {
        self.gone.cancelled().await;
    }

    /// Whether frames wait for the client (it is behind).
    pub(crate) fn is_behind(&self) -> bool {
        !self.lock().frames.is_empty()
    }

    /// How long since the last frame was queued.
    pub(crate) fn idle_for(&self) -> Duration {
        self.lock().last_queued.elapsed()
    }

    /// How long frames have waited without the client taking one, if some
    /// wait.
    pub(crate) fn stalled_for(&self) -> Option<Duration> {
        let state = self.lock();
        (!state.frames.is_empty()).then(|| state.last_taken.elapsed())
    }

    /// Queues `frame` if the subscription has room (a frame always fits an
    /// empty queue), taking its bytes from the budget; see [`Pushed`].
    pub(crate) async fn push(&self, frame: pb::SubscribeResponse) -> Pushed {
        let size = frame.encoded_len();
        {
            let mut state = self.lock();
            if !matches!(state.end, End::Open) {
                return Pushed::Ended;
            }
            if state.queued > 0 && state.queued + size > defaults::SUBSCRIPTION_QUEUE_BYTES {
                return Pushed::Full;
            }
            state.queued += size;
        }
        match self.account.reserve(size).await {
            Ok(grant) => {
                if self.enqueue(frame, grant) {
                    Pushed::Queued
                } else {
                    Pushed::Ended
                }
            }
            Err(exhausted) => {
                self.unqueue(size);
                self.out_of_memory(exhausted);
                Pushed::Ended
            }
        }
    }

    /// Waits for room for `bytes` (always granted to an empty queue) and
    /// takes them from the budget; `None` once the subscription ended.
    pub(crate) async fn reserve(self: &Arc<Self>, bytes: usize) -> Option<Reservation> {
        loop {
            let room = self.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            {
                let mut state = self.lock();
                if !matches!(state.end, End::Open) {
                    return None;
                }
                if state.queued == 0 || state.queued + bytes <= defaults::SUBSCRIPTION_QUEUE_BYTES {
                    state.queued += bytes;
                    break;
                }
            }
            tokio::select! {
                () = room => {}
                () = self.ended.cancelled() => return None,
            }
        }
        match self.account.reserve(bytes).await {
            Ok(grant) => Some(Reservation { outbox: self.clone(), grant, room: bytes }),
            Err(exhausted) => {
                self.unqueue(bytes);
                self.out_of_memory(exhausted);
                None
            }
        }
    }

    /// Queues a frame whose room and bytes are already counted; false (and
    /// the frame dropped) when the subscription ended meanwhile.
    fn enqueue(&self, frame: pb::SubscribeResponse, grant: Grant) -> bool {
        let waker = {
            let mut state = self.lock();
            if !matches!(state.end, End::Open) {
                state.queued -= grant.bytes();
                drop(state);
                self.room.notify_waiters();
                return false;
            }
            let now = Instant::now();
            if state.frames.is_empty() {
                state.last_taken = now;
            }
            state.last_queued = now;
            state.frames.push_back((frame, grant));
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
        true
    }

    fn unqueue(&self, bytes: usize) {
        self.lock().queued -= bytes;
        self.room.notify_waiters();
    }

    /// Ends the subscription after the frames already queued: with `status`
    /// when it failed, cleanly otherwise.
    pub(crate) fn finish(&self, status: Option<tonic::Status>) {
        let waker = {
            let mut state = self.lock();
            if matches!(state.end, End::Open) {
                state.end = status.map_or(End::Finished, End::Failed);
            }
            state.waker.take()
        };
        self.ended.cancel();
        self.room.notify_waiters();
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Ends the subscription now, dropping what it queued: the client gets
    /// `status` as soon as it reads again.
    fn abandon(&self, status: tonic::Status) {
        let (dropped, waker) = {
            let mut state = self.lock();
            if !matches!(state.end, End::Open) {
                return;
            }
            let dropped: Vec<_> = state.frames.drain(..).collect();
            state.queued -= dropped.iter().map(|(_, grant)| grant.bytes()).sum::<usize>();
            state.end = End::Failed(status);
            (dropped, state.waker.take())
        };
        // Outside the lock: dropping grants returns bytes to the budget.
        drop(dropped);
        self.ended.cancel();
        self.room.notify_waiters();
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Ends a subscription whose client took nothing for too long.
    pub(crate) fn stall(&self, waited: Duration) {
        metrics::counter!(telemetry::SUBSCRIPTIONS_ENDED, telemetry::LABEL_REASON => "stalled").increment(1);
        tracing::info!(subscriber = %self.subscriber, waited = ?waited, "ending a stalled subscription");
        self.abandon(tonic::Status::unavailable(format!(
            "subscriber {}: frames waited {waited:.0?} without being read (the limit is {:?}); \
             resubscribe from your checkpoint",
            self.subscriber,
            defaults::SUBSCRIBER_STALL_TIMEOUT
        )));
    }

    /// Ends a subscription the budget could not serve while it was the one
    /// furthest behind.
    fn out_of_memory(&self, exhausted: Exhausted) {
        metrics::counter!(telemetry::SUBSCRIPTIONS_ENDED, telemetry::LABEL_REASON => "memory").increment(1);
        self.evicted(exhausted.limit);
    }

    fn evicted(&self, limit: usize) {
        tracing::info!(subscriber = %self.subscriber, "ending the subscription furthest behind to stay within memory");
        self.abandon(tonic::Status::unavailable(format!(
            "subscriber {}: reads too slowly; this replica's subscription memory ({} bytes, \
             --subscription-memory) is full and this subscription was the furthest behind; \
             resubscribe from your checkpoint",
            self.subscriber, limit
        )));
    }

    /// The stream the gRPC service returns; it holds `allowance` (the
    /// subscription's fixed share of the budget) for as long as the server
    /// holds it.
    pub(crate) fn stream(self: &Arc<Self>, allowance: Grant) -> FrameStream {
        FrameStream { outbox: self.clone(), _allowance: allowance }
    }
}

impl Evict for Outbox {
    fn evict(&self) {
        // The budget counted the ending already.
        self.evicted(self.account.limit());
    }
}

/// Room and bytes reserved for frames a follower is about to build.
pub(crate) struct Reservation {
    outbox: Arc<Outbox>,
    grant: Grant,
    /// Room still reserved (not yet taken by frames).
    room: usize,
}

impl Reservation {
    /// Queues `frame` on the reserved room, taking more from the budget if
    /// it is larger than what is left; false when the subscription ended.
    pub(crate) async fn push(&mut self, frame: pb::SubscribeResponse) -> bool {
        let size = frame.encoded_len();
        let mut grant = self.grant.split(size);
        let taken = grant.bytes();
        self.room -= taken.min(self.room);
        if taken < size {
            let extra = size - taken;
            self.outbox.lock().queued += extra;
            match self.outbox.account.reserve(extra).await {
                Ok(more) => grant.merge(more),
                Err(exhausted) => {
                    self.outbox.unqueue(extra);
                    // The frame's room goes back with it.
                    self.outbox.unqueue(taken);
                    self.outbox.out_of_memory(exhausted);
                    return false;
                }
            }
        }
        self.outbox.enqueue(frame, grant)
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.outbox.unqueue(self.room);
    }
}

/// A subscription's response stream: the outbox's frames, then its end.
pub(crate) struct FrameStream {
    outbox: Arc<Outbox>,
    _allowance: Grant,
}

impl Stream for FrameStream {
    type Item = Result<pb::SubscribeResponse, tonic::Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let outbox = &self.outbox;
        let (item, released) = {
            let mut state = outbox.lock();
            // Asked for the next frame: the server is done with the last one.
            let released = state.in_flight.take();
            let item = match state.frames.pop_front() {
                Some((frame, grant)) => {
                    state.queued -= grant.bytes();
                    state.in_flight = Some(grant);
                    state.last_taken = Instant::now();
                    Poll::Ready(Some(Ok(frame)))
                }
                None => match std::mem::replace(&mut state.end, End::Finished) {
                    End::Failed(status) => Poll::Ready(Some(Err(status))),
                    End::Finished => Poll::Ready(None),
                    End::Open => {
                        state.end = End::Open;
                        state.waker = Some(cx.waker().clone());
                        Poll::Pending
                    }
                },
            };
            (item, released)
        };
        drop(released);
        if matches!(item, Poll::Ready(Some(Ok(_)))) {
            outbox.room.notify_waiters();
        }
        item
    }
}

impl Drop for FrameStream {
    fn drop(&mut self) {
        self.outbox.gone.cancel();
        self.outbox.finish(None);
        // Nobody will read them: return their bytes now.
        let dropped = {
            let mut state = self.outbox.lock();
            let dropped: Vec<_> = state.frames.drain(..).collect();
            state.queued -= dropped.iter().map(|(_, grant)| grant.bytes()).sum::<usize>();
            (dropped, state.in_flight.take())
        };
        drop(dropped);
        self.outbox.room.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt as _;

    use super::*;

    fn frame(bytes: usize) -> pb::SubscribeResponse {
        pb::SubscribeResponse {
            frame: Some(pb::subscribe_response::Frame::Events(pb::EventBatch {
                shard_id: "x".repeat(bytes),
                events: Vec::new(),
            })),
        }
    }

    fn outbox(budget: &Budget, name: &str) -> (Arc<Outbox>, FrameStream) {
        let outbox = Outbox::new(budget, SubscriberId::parse(name).expect("valid"));
        let allowance = outbox.allowance(1024).expect("an allowance");
        let stream = outbox.stream(allowance);
        (outbox, stream)
    }

    #[tokio::test]
    async fn a_full_outbox_refuses_live_frames_and_the_stream_releases_what_it_took() {
        let budget = Budget::new(64 * 1024 * 1024);
        let (outbox, mut stream) = outbox(&budget, "reader");
        let half = defaults::SUBSCRIPTION_QUEUE_BYTES / 2;
        assert_eq!(outbox.push(frame(half)).await, Pushed::Queued);
        assert_eq!(outbox.push(frame(half - 64)).await, Pushed::Queued);
        assert_eq!(outbox.push(frame(half)).await, Pushed::Full, "past the subscription's room");
        let held = budget.used();
        stream.next().await.expect("a frame").expect("not an error");
        assert_eq!(budget.used(), held, "the frame taken is held until the next poll");
        stream.next().await.expect("a frame").expect("not an error");
        assert!(budget.used() < held, "the first frame was released");
        outbox.finish(None);
        assert!(stream.next().await.is_none());
        drop(stream);
        assert_eq!(budget.used(), 0);
    }

    #[tokio::test]
    async fn the_subscription_furthest_behind_is_ended_at_once_when_memory_runs_short() {
        let limit = 3 * defaults::SUBSCRIPTION_QUEUE_BYTES;
        let budget = Budget::new(limit);
        let (stalled, mut stalled_stream) = outbox(&budget, "stalled");
        let (reader, _reader_stream) = outbox(&budget, "reader");
        // The stalled one fills its room and reads nothing.
        let big = defaults::SUBSCRIPTION_QUEUE_BYTES - 4096;
        assert_eq!(stalled.push(frame(big)).await, Pushed::Queued);
        // The reader needs more than what is left: the stalled one goes,
        // its frames with it, though its client never polls.
        let room = reader.reserve(limit - big / 2).await.expect("room once the stalled one is gone");
        assert!(stalled.ended.is_cancelled());
        assert!(budget.used() <= limit);
        drop(room);
        match stalled_stream.next().await {
            Some(Err(status)) => {
                assert_eq!(status.code(), tonic::Code::Unavailable);
                assert!(status.message().contains("resubscribe from your checkpoint"), "{}", status.message());
            }
            other => panic!("expected the ending status first, got {other:?}"),
        }
        assert!(stalled_stream.next().await.is_none());
    }
}
