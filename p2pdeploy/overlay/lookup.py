"""The iterative node lookup of Kademlia as an explicit query object.

A lookup keeps a shortlist of candidates ordered by XOR distance to its target. It asks up
to ``alpha`` of the closest unqueried candidates at a time, merges the contacts each answer
returns, and finishes when the ``k`` closest candidates that have not failed have all
answered (the paper's termination rule). A candidate that times out is marked failed and the
next closest takes its place.

With ``paths > 1`` it runs S/Kademlia's disjoint lookups: the initial candidates are dealt to
``paths`` shortlists and a node is queried by at most one path, so one adversarial region
cannot capture every path. The result is the k closest answered nodes over all paths.

The object sends nothing itself: the protocol asks ``next_requests()`` whom to ask and feeds
back ``answered``/``failed``. It never reads a clock.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from enum import Enum

from p2pdeploy.overlay.routing import Contact


class CandidateState(Enum):
    fresh = "fresh"
    waiting = "waiting"
    answered = "answered"
    failed = "failed"


@dataclass(slots=True)
class Candidate:
    contact: Contact
    distance: int
    path: int
    hops: int
    state: CandidateState = CandidateState.fresh


@dataclass(slots=True)
class _Path:
    candidates: list[Candidate] = field(default_factory=list)  # kept sorted by distance
    in_flight: int = 0
    finished: bool = False


def _distance(candidate: Candidate) -> int:
    return candidate.distance


class Lookup:
    def __init__(
        self,
        target: int,
        seeds: list[Contact],
        *,
        k: int,
        alpha: int,
        own_id: int,
        paths: int = 1,
    ) -> None:
        if paths < 1:
            raise ValueError(f"paths must be >= 1 (got {paths})")
        self.target = target
        self.k = k
        self.alpha = alpha
        self.own_id = own_id
        self.paths = [_Path() for _ in range(paths)]
        self.by_id: dict[int, Candidate] = {}
        self.requests_sent = 0
        self.failures = 0
        ordered = sorted(seeds, key=lambda c: c.node_id ^ target)
        for index, contact in enumerate(ordered):
            self._add(contact, index % paths, hops=1)

    def _add(self, contact: Contact, path: int, hops: int) -> None:
        node_id = contact.node_id
        if node_id == self.own_id or node_id in self.by_id:
            return  # a node belongs to one path only (disjointness)
        candidate = Candidate(contact, node_id ^ self.target, path, hops)
        self.by_id[node_id] = candidate
        bisect.insort(self.paths[path].candidates, candidate, key=_distance)

    def _head(self, path: _Path) -> list[Candidate]:
        """The k closest candidates of a path that have not failed."""
        head = []
        for candidate in path.candidates:
            if candidate.state is not CandidateState.failed:
                head.append(candidate)
                if len(head) == self.k:
                    break
        return head

    def next_requests(self) -> list[Contact]:
        """Whom to ask now; each returned contact is marked as waiting for an answer."""
        out = []
        for path in self.paths:
            if path.finished:
                continue
            head = self._head(path)
            for candidate in head:
                if path.in_flight >= self.alpha:
                    break
                if candidate.state is CandidateState.fresh:
                    candidate.state = CandidateState.waiting
                    path.in_flight += 1
                    self.requests_sent += 1
                    out.append(candidate.contact)
            if path.in_flight == 0 and all(c.state is CandidateState.answered for c in head):
                path.finished = True
        return out

    def answered(self, node_id: int, contacts: list[Contact]) -> None:
        candidate = self.by_id.get(node_id)
        if candidate is None or candidate.state in (CandidateState.answered,):
            return
        if candidate.state is CandidateState.waiting:
            self.paths[candidate.path].in_flight -= 1
        candidate.state = CandidateState.answered
        for contact in contacts:
            self._add(contact, candidate.path, candidate.hops + 1)

    def failed(self, node_id: int) -> None:
        candidate = self.by_id.get(node_id)
        if candidate is None or candidate.state is not CandidateState.waiting:
            return
        self.paths[candidate.path].in_flight -= 1
        candidate.state = CandidateState.failed
        self.failures += 1

    @property
    def done(self) -> bool:
        return all(path.finished for path in self.paths)

    def finish(self) -> None:
        """Stop early (a value was found): nothing more is asked."""
        for path in self.paths:
            path.finished = True

    def closest_answered(self) -> list[Candidate]:
        answered = [c for c in self.by_id.values() if c.state is CandidateState.answered]
        answered.sort(key=lambda c: c.distance)
        return answered[: self.k]

    def result(self) -> list[Contact]:
        return [c.contact for c in self.closest_answered()]

    def hops(self) -> int:
        closest = self.closest_answered()
        return closest[0].hops if closest else 0

    def waiting(self) -> list[Contact]:
        return [c.contact for c in self.by_id.values() if c.state is CandidateState.waiting]
