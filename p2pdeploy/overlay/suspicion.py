"""Suspicions: the contacts a node avoids for a while, one list per node for every layer.

A layer that sends a request to a contact and hears nothing back (broadcast's delegate,
multicast's routed hop, the aggregation tree's parent) suspects it until some time and, while
the suspicion holds, routes around it; hearing from it again clears the suspicion. The list
lives in the overlay (:attr:`Kademlia.suspicions <p2pdeploy.overlay.kademlia.Kademlia.suspicions>`)
so that a contact one layer found silent is avoided by the others too, and it is backed by the
node's failure detector (:mod:`p2pdeploy.overlay.swim`) where one runs below the overlay: a
contact the detector declared dead is suspected whatever the layers saw.

This is not the failure detector: a suspicion here is a layer's local, time-limited hint that
costs no message; the detector's verdicts come from probing and are what the node acts on.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from p2pdeploy.overlay.swim import FailureDetector

#: Most suspicions kept; beyond it the expired ones go, then the ones that end soonest.
MAX_SUSPICIONS = 4096


class Suspicions:
    """Node id -> until when the node is avoided (absolute simulated or monotonic time)."""

    def __init__(self, detector: FailureDetector | None = None, max_entries: int = MAX_SUSPICIONS) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1 (got {max_entries})")
        #: The failure detector below the overlay, or None.
        self.detector = detector
        self.max_entries = max_entries
        self._until: dict[int, float] = {}

    def suspect(self, node_id: int, until: float, now: float) -> None:
        """Avoid ``node_id`` until ``until`` (a longer suspicion already held is kept)."""
        held = self._until.get(node_id)
        if held is not None and held >= until:
            return
        self._until[node_id] = until
        if len(self._until) > self.max_entries:
            self._forget_expired(now)
            while len(self._until) > self.max_entries:
                del self._until[min(self._until, key=self._until.__getitem__)]

    def clear(self, node_id: int) -> None:
        """``node_id`` was heard from: it is no longer avoided (unless the detector holds it dead)."""
        self._until.pop(node_id, None)

    def suspected(self, node_id: int, now: float) -> bool:
        """Avoid ``node_id`` now: a layer's suspicion holds, or the detector declared it dead."""
        until = self._until.get(node_id)
        if until is not None:
            if until > now:
                return True
            del self._until[node_id]  # the suspicion ran out
        return self.detector is not None and self.detector.dead(node_id)

    def active(self, now: float) -> Iterator[int]:
        """The node ids a layer's suspicion still holds at ``now`` (not the detector's dead)."""
        return (node_id for node_id, until in self._until.items() if until > now)

    def until(self, node_id: int) -> float | None:
        """Until when a layer's suspicion of ``node_id`` holds (None: none recorded)."""
        return self._until.get(node_id)

    def __len__(self) -> int:
        return len(self._until)

    def _forget_expired(self, now: float) -> None:
        self._until = {node_id: until for node_id, until in self._until.items() if until > now}
