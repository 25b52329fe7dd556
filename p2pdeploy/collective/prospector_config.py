"""The resource prospector's parameters: the aggregation tree's, then its queries'.

One frozen dataclass read by both parts of the prospector (:mod:`p2pdeploy.collective.aggregation_tree`
and :mod:`p2pdeploy.collective.prospector_queries`); every node of a community should agree on
``tree``, whose key places the root.
"""

from __future__ import annotations

from dataclasses import dataclass

from p2pdeploy.collective.aggregation import Limits
from p2pdeploy.core import require_at_least, require_positive
from p2pdeploy.overlay.identity import key_id


@dataclass(frozen=True, slots=True)
class ProspectorConfig:
    """Tunable parameters of the prospector; every node of a community should agree on ``tree``."""

    # the tree: updates, acks, expiry, parent choice
    tree: str = "p2pdeploy/resources"
    update_interval_s: float = 10.0
    min_update_interval_s: float = 1.0
    expiry_s: float = 25.0
    ack_timeout_s: float = 2.0
    update_tries: int = 2
    suspect_s: float = 300.0
    parent_choices: int = 8
    max_children: int = 4096
    # the queries: prospects and aggregates
    rpc_timeout_s: float = 2.0
    root_timeout_s: float = 5.0
    alpha: int = 3
    candidate_factor: int = 2
    max_subtrees: int = 32
    max_visits: int = 64
    verify_candidates: bool = True
    spread: tuple[str, ...] = ("owner", "region")
    # the summaries (see :class:`~p2pdeploy.collective.aggregation.Limits`)
    max_distinct: int = 16
    max_attributes: int = 64
    top_k: int = 3
    top_attributes: tuple[str, ...] = ("memory_free", "cpu_free", "disk_free")

    def __post_init__(self) -> None:
        if not self.tree:
            raise ValueError("prospector.tree must name the tree (got an empty string)")
        require_positive(self, "prospector.", "update_interval_s", "min_update_interval_s", "ack_timeout_s",
                         "suspect_s", "rpc_timeout_s", "root_timeout_s")
        if self.min_update_interval_s > self.update_interval_s:
            raise ValueError(
                f"prospector.min_update_interval_s must be <= update_interval_s "
                f"(got {self.min_update_interval_s} > {self.update_interval_s})"
            )
        if not self.expiry_s > self.update_interval_s:
            raise ValueError(
                f"prospector.expiry_s must be > update_interval_s, or live children expire "
                f"(got {self.expiry_s} <= {self.update_interval_s})"
            )
        require_at_least(self, "prospector.", 1, "update_tries", "parent_choices", "max_children", "alpha",
                         "candidate_factor", "max_subtrees", "max_visits", "max_distinct", "max_attributes")
        require_at_least(self, "prospector.", 0, "top_k")

    @property
    def limits(self) -> Limits:
        return Limits(self.max_distinct, self.max_attributes, self.top_k, frozenset(self.top_attributes))

    @property
    def key(self) -> int:
        """The tree's key: its root is the live node closest to it."""
        return key_id(self.tree.encode())



__all__ = ["ProspectorConfig"]
