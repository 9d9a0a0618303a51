"""The fleet's shared subscription: a connection of its own whose session ends with it, and leaving the group.

With `mqtt.share: {group: G, prefix: F}` a member takes its share of
F/in/<stream> over `$share/G/F/in/+` on this second connection (client id
`<client_id>-share`), never on the daemon's own one:

- clean start and Session Expiry 0: when the broker notices that a member is
  gone, the member's session, and with it its place in the group, ends at
  once. A persistent session would keep being handed its share of new frames
  until the member came back or the session expired (Mosquitto 2.0.11,
  FIELD-NOTES: a third of the stream unanswered after one of three died).
- a small Receive Maximum (`mqtt.share.receive_maximum`, default two frames
  per worker): at most that many frames are in flight to a member, so at most
  that many go with a member that dies (plus what the broker queued for it
  before it noticed; README "Scale-out").
- an acknowledgement is bound to the connection the frame came on: after a
  reconnect the broker reuses packet ids for other frames, so the ack of a
  frame from a previous connection is dropped (that frame is not delivered
  again anyway; its answer still goes out on the daemon's own link).
- leaving (SIGTERM): UNSUBSCRIBE, then serve every frame the broker still
  sends (it may have queued some for us before the UNSUBSCRIBE) until one
  more UNSUBSCRIBE comes back with nothing outstanding, nothing arrived
  and no PUBACK sent since it went out: the broker answers in order on one
  connection, so nothing was left behind. (A PUBACK sent behind the marker
  frees a Receive Maximum slot, and the broker may fill it from its queue
  after the UNSUBACK: that round does not count.) Only then is the
  connection closed.

Answers go out on the daemon's own link (edged.results), whose persistent
session holds them across a reconnect: a frame a member already holds is
answered even when this connection is the one that broke.
"""
from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from typing import Any

from edged.config import Config
from edged.door import Door, Incoming
from edged.ioloop import IoLoop
from edged.mqtt import MqttLink, frame_subscription, share_filter

logger = logging.getLogger(__name__)


def receive_maximum(cfg: Config) -> int:
    """Frames of the group in flight to this member: mqtt.share.receive_maximum, else two per worker."""
    share = cfg.mqtt.share
    if share is not None and share.receive_maximum:
        return share.receive_maximum
    return max(1, cfg.worker_count * cfg.queue.inflight_per_worker)


class ShareLink(MqttLink):
    """The `$share` subscription on a clean-session connection; frames go to the same on_frame as the own link's."""

    persistent = False

    def __init__(self, cfg: Config, on_frame: Callable[[Incoming], None], *, loop: IoLoop, door: Door) -> None:
        super().__init__(cfg, on_frame, None, loop=loop, door=door, client_id=f"{cfg.client_id}-share")
        filt = share_filter(cfg)
        assert filt is not None, "ShareLink needs mqtt.share"
        self.filter = filt
        self.subscribed = False
        self.generation = 0  # changes at every connect and every loss: acks are bound to one
        self.taken = 0  # frames taken over the group
        self.acks_dropped = 0  # acks of frames from a connection that is gone
        self._olock = threading.Lock()
        self._outstanding: set[int] = set()  # QoS 1 frames taken on this connection, not yet acknowledged
        self.leaving = False
        self._left = threading.Event()
        self._marker_out = False  # an UNSUBSCRIBE is on its way (leaving)
        self._arrived = False  # a frame came since the last marker went out
        self._rounds = 0  # markers sent while leaving
        self._taken_at_leave = 0
        self._acked = False  # a PUBACK was queued since the last marker went out (set once it is queued)

    # ---- session hooks (MqttLink) --------------------------------------------------------------------------
    def receive_maximum(self) -> int:
        return receive_maximum(self.cfg)

    def subscriptions(self) -> list[tuple[str, Any]]:
        return [frame_subscription(self.filter)]

    def _connected_hook(self) -> None:
        self.generation += 1
        self.subscribed = False  # until the SUBACK
        logger.info("fleet: joined the connection for %s (Receive Maximum %d)", self.filter, self.receive_maximum())

    def _on_subscribe(self, client: Any, userdata: object, mid: int, codes: list[Any], props: object) -> None:
        super()._on_subscribe(client, userdata, mid, codes, props)
        self.subscribed = not any(c.is_failure for c in codes)

    def _disconnected_hook(self) -> None:
        self.generation += 1
        self.subscribed = False
        with self._olock:
            held, self._outstanding = len(self._outstanding), set()
        if held:
            logger.warning("fleet: connection lost with %d frame(s) of the group in hand: they are answered, "
                           "not acknowledged (the broker ended that session)", held)
        if self.leaving:
            self._left.set()

    def _deliver(self, inc: Incoming) -> None:
        if inc.qos > 0:
            with self._olock:
                self._outstanding.add(inc.mid)
        self.taken += 1
        self._arrived = True
        inc.ack = functools.partial(self._ack_on, self.generation)
        self.on_frame(inc)

    # ---- acknowledgements (any thread) ---------------------------------------------------------------------
    def ack(self, mid: int, qos: int) -> None:
        self._ack_on(self.generation, mid, qos)

    def _ack_on(self, generation: int, mid: int, qos: int) -> None:
        if generation != self.generation:
            self.acks_dropped += 1
            return
        with self._olock:
            self._outstanding.discard(mid)
            empty = not self._outstanding
        super().ack(mid, qos)
        self._acked = True  # after the PUBACK is queued: a marker that clears it goes out behind that PUBACK
        if empty and self.leaving:
            self.loop.call_soon(self._next_marker)

    def outstanding(self) -> int:
        with self._olock:
            return len(self._outstanding)

    # ---- leaving the group (SIGTERM) -----------------------------------------------------------------------
    def leave(self, timeout: float) -> bool:
        """From any thread but the loop: stop taking the group's frames, serve what the broker still sends,
        then close. True when the broker confirmed that nothing was left behind within `timeout` seconds."""
        if not self.loop.running():
            return not self.connected
        self.loop.call_soon(self._leave)
        left = self._left.wait(timeout)
        self.stop()
        return left

    def _leave(self) -> None:
        self.leaving = True
        self._closing = True  # a connection lost now is not made again
        if not self.connected or self._sock is None:
            self._left.set()
            return
        logger.info("fleet: leaving %s (%d frame(s) outstanding)", self.filter, self.outstanding())
        self._taken_at_leave = self.taken
        self._send_marker()

    def _send_marker(self) -> None:
        self._arrived = self._acked = False
        self._marker_out = True
        self._rounds += 1
        if not self.unsubscribe([self.filter], self._marker_back):
            self._marker_out = False
            self._left.set()  # not connected any more: nothing more can come

    def _marker_back(self) -> None:
        self._marker_out = False
        self.subscribed = False
        if self.outstanding():
            return  # the ack that empties it sends the next marker
        if self._arrived or self._acked:
            # frames came while it travelled, or a PUBACK went out behind it: the broker may send what that
            # PUBACK made room for after this UNSUBACK (what it had queued for us): one more round
            self._send_marker()
            return
        logger.info("fleet: left %s, nothing left behind (%d frame(s) came after the UNSUBSCRIBE, %d round(s))",
                    self.filter, self.taken - self._taken_at_leave, self._rounds)
        self._left.set()

    def _next_marker(self) -> None:
        if self.leaving and not self._marker_out and not self._left.is_set() and not self.outstanding():
            self._send_marker()

    def stop(self, final_status: bytes = b"", timeout: float = 2.0) -> None:
        """Close the connection (no status of its own: P/status is the own link's)."""
        self._closing = True
        if not self.loop.running():
            self.client.disconnect()
            return
        self.loop.call_soon(self._disconnect)
        self._stopped.wait(timeout)

    def stats(self) -> dict[str, Any]:
        return {"connected": self.connected, "subscribed": self.subscribed, "filter": self.filter,
                "receive_maximum": self.receive_maximum(), "outstanding": self.outstanding(), "taken": self.taken,
                "reconnects": self.reconnects, "acks_dropped": self.acks_dropped}
