"""Admission and dispatch: frames, their per-stream queues, and handing them to workers.

`admit()` runs on the I/O thread for every frame message the MQTT adapter
let in: it decides at once (refused at the door -> `bad_request`; too large;
too many streams or a full queue -> `overloaded` by the policy), copies the
payload once into a pool block that the frame's Lease owns, and hands the
frame to a free worker from the same thread. The dispatcher thread is the
fallback for frames that waited (a restart, a reload, a retry).

Streams: only a stream that holds queued frames has state (a deque and one
place in the round-robin), so the cost of a dispatch does not depend on how
many stream names were ever seen; at most `queue.max_streams` streams hold
frames at once. Streams take turns among those that hold frames.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from edged.config import Config
from edged.metrics import Metrics
from edged.pool import FramePool, Lease

if TYPE_CHECKING:
    from edged.door import Incoming
    from edged.results import Results
    from edged.workers import WorkerHandle

logger = logging.getLogger(__name__)


@dataclass(slots=True, eq=False, kw_only=True)
class Frame:
    """One accepted frame, from admission to its answer. `lease` owns its pool block."""

    seq: int
    stream: str
    out_topic: str  # where its answer goes: the Response Topic, else default_topic
    default_topic: str  # P/out/<stream> (or the fleet's F/out/<stream>)
    length: int
    frame_id: str
    correlation: bytes | None
    content_type: str | None
    mid: int
    qos: int
    t_in: float
    expires_at: float | None = None
    lease: Lease | None = None
    t_dispatch: float = 0.0
    deaths: int = 0  # worker deaths while this frame was in flight on them
    ack: Callable[[int, int], None] | None = None  # Incoming.ack: None acknowledges on the daemon's own link


class Admission:
    """Per-stream queues and the hand-off to workers; `cond` is the supervisor's one lock."""

    def __init__(self, cfg: Config, pool: FramePool, cond: threading.Condition, results: Results, metrics: Metrics,
                 ready_workers: Callable[[], list[WorkerHandle]]) -> None:
        self.cfg = cfg
        self.pool = pool
        self.cond = cond
        self.results = results
        self.metrics = metrics
        self.ready_workers = ready_workers
        self.queues: dict[str, collections.deque[Frame]] = {}  # only streams that hold frames
        self.turns: collections.deque[str] = collections.deque()  # those streams, in turn
        self.seq = 0
        self.stopping = False
        # a frame the pool can never hold is too large, not a reason to drop the queue for it
        self.max_frame = min(cfg.queue.max_frame_bytes, int(cfg.pool.max_mb * (1 << 20)))

    # ---- admission (I/O thread) ---------------------------------------------------------------------------------
    def admit(self, inc: Incoming) -> None:
        """Decide at once, never block; every frame taken here is answered exactly once."""
        now = time.monotonic()
        with self.cond:
            self.seq += 1
            seq = self.seq
        fid = inc.frame_id or (inc.correlation.hex() if inc.correlation else str(seq))
        f = Frame(seq=seq, stream=inc.stream, out_topic=inc.reply_topic or inc.out_topic, default_topic=inc.out_topic,
                  length=len(inc.payload),
                  frame_id=fid, correlation=inc.correlation, content_type=inc.content_type, mid=inc.mid, qos=inc.qos,
                  t_in=now, expires_at=now + inc.expiry_s if inc.expiry_s else None, ack=inc.ack)
        self.metrics.count("received")
        if inc.refusal is not None:
            self.results.fail(f, "bad_request", inc.refusal)
            return
        if len(inc.payload) > self.max_frame:
            self.metrics.count("too_large")
            self.results.fail(f, "too_large", f"payload of {len(inc.payload)} bytes exceeds {self.max_frame} "
                              "(queue.max_frame_bytes, and no more than pool.max_mb)")
            return
        # the one copy of the payload: into a pool block, now; the queue holds leases, not bytes
        f.lease = self.pool.lease(inc.payload)
        victims: list[tuple[Frame, str]] = []
        policy = self.cfg.queue.policy
        refused: str | None = None
        with self.cond:
            queue = self.queues.get(f.stream)
            if queue is None and len(self.queues) >= self.cfg.queue.max_streams:
                refused = f"{len(self.queues)} streams already hold queued frames (queue.max_streams)"
            else:
                while f.lease is None and policy == "drop_oldest" and queue:
                    old = queue.popleft()
                    if old.lease is not None:
                        old.lease.release()  # its room, now: the new frame may fit in it
                    victims.append((old, "frame pool is full (pool.max_mb)"))
                    f.lease = self.pool.lease(inc.payload)
                if f.lease is None:
                    refused = "frame pool is full (pool.max_mb)"
                elif queue is not None and len(queue) >= self.cfg.queue.max_per_stream:
                    why = f"queue for stream {f.stream!r} is full ({self.cfg.queue.max_per_stream} frames)"
                    if policy == "drop_oldest":
                        victims.append((queue.popleft(), why))
                    else:
                        refused = why
                if refused is None:
                    self._queue(f.stream).append(f)
                elif queue is not None and not queue:
                    del self.queues[f.stream]
                    self.turns.remove(f.stream)  # rare: its last frames gave way to a frame that did not fit
            # no notify: dispatch_ready below hands the frame over from this thread; waking the
            # dispatcher for every frame cost it 4.5 context switches per frame, for nothing
        if refused is not None:
            victims.append((f, refused))
        for victim, why in victims:
            self.metrics.count("dropped")
            self.results.fail(victim, "overloaded", f"{why}, policy {policy}")
        self.dispatch_ready()

    def _queue(self, stream: str) -> collections.deque[Frame]:
        """Under the lock: the stream's queue, given state and a turn when it had none."""
        q = self.queues.get(stream)
        if q is None:
            q = self.queues[stream] = collections.deque()
            self.turns.append(stream)
        return q

    def requeue(self, frame: Frame) -> None:
        """A frame back at the head of its stream (a retry after a worker's death, or a worker going away)."""
        with self.cond:
            q = self.queues.get(frame.stream)
            if q is None:
                q = self.queues[frame.stream] = collections.deque()
                self.turns.appendleft(frame.stream)
            q.appendleft(frame)
            self.cond.notify_all()

    def depth(self) -> int:
        return sum(len(q) for q in self.queues.values())

    def streams(self) -> int:
        return len(self.queues)

    # ---- dispatch -----------------------------------------------------------------------------------------------
    def _pick(self) -> tuple[Frame, WorkerHandle] | None:
        """Under the lock: the next frame (streams in turn) and the least busy ready worker. O(1) in streams."""
        if not self.turns:
            return None
        # a frame that outlived a worker's death runs alone: so does the poison among them, and it alone dies again
        ready = [h for h in self.ready_workers() if not h.inflight.suspects]
        if not ready:
            return None
        stream = self.turns[0]
        q = self.queues[stream]
        if q[0].deaths:
            ready = [h for h in ready if not h.inflight]
            if not ready:
                return None  # it waits at the head of its stream for an idle worker
        self.turns.popleft()
        frame = q.popleft()
        if q:
            self.turns.append(stream)
        else:
            del self.queues[stream]
        return frame, min(ready, key=lambda h: len(h.inflight))

    def dispatch_loop(self) -> None:
        while True:
            with self.cond:
                while True:
                    if self.stopping and not self.depth():
                        return
                    picked = self._pick()
                    if picked is not None:
                        break
                    self.cond.wait(0.5)
            if not self._dispatch_guarded(*picked):
                with self.cond:
                    self.cond.wait(0.05)  # the worker is going away: let its exit or restart settle

    def dispatch_ready(self) -> None:
        """Hand queued frames to idle workers from the calling thread: no wake-up of the dispatcher on the hot path."""
        while not self.stopping:
            with self.cond:
                picked = self._pick()
            if picked is None:
                return
            if not self._dispatch_guarded(*picked):
                with self.cond:
                    self.cond.notify_all()  # never wait here (the I/O thread): the dispatcher retries
                return

    def _dispatch_guarded(self, frame: Frame, worker: WorkerHandle) -> bool:
        """False when the frame went back to the head of its queue."""
        try:
            return self._dispatch(frame, worker)
        except Exception:  # top of a dispatch: answer the frame, keep serving
            logger.exception("dispatch of frame %s failed", frame.frame_id)
            self.results.fail(frame, "internal_error", f"edged failed dispatching frame {frame.frame_id}")
            return True

    def _dispatch(self, frame: Frame, worker: WorkerHandle) -> bool:
        now = time.monotonic()
        if frame.expires_at is not None and now > frame.expires_at:
            self.metrics.count("expired")
            self.results.fail(frame, "expired", "message expiry passed before inference")
            return True
        block = frame.lease.block if frame.lease is not None else None
        with self.cond:
            if worker.state != "ready" or block is None or self.pool.segment(block.segment) is None:
                self.requeue(frame)  # the lock is re-entrant
                return False
            frame.t_dispatch = now
            worker.inflight[frame.seq] = frame
        worker.send_frame(frame.seq, self.pool, block, frame.length, frame.content_type)
        return True
