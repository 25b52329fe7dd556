"""Who may enter a routing table: a key challenge, and limits per address prefix.

A sender's node id is otherwise taken on its word: one socket that sends requests under random
ids fills every bucket with contacts that answer nothing, and each lookup then waits on them
(S/Kademlia's first concern). Two checks stand before :meth:`RoutingTable.add`:

- **The key challenge.** A contact heard at an address it has not proved joins the table only
  after it answered a :class:`Challenge` sent to that address: a fresh nonce, which it signs
  with the key its id is derived from (``node_id_of(public_key)``), bound to the challenger's
  id. The answer proves the key and that the address receives (the nonce travels to it and
  nowhere else). A contact proved once is remembered (bounded), so it costs one round trip per
  node and address, not one per message; an address change is proved again, so no one can move
  another node's entry to an address of its own. Challenges in flight are bounded; a flood of
  forged senders costs one small datagram each up to the bound and nothing beyond it.
- **Address prefixes.** Keys are free to make, so the challenge alone does not stop one
  machine from entering many ids. A table keeps at most ``prefix_per_bucket`` contacts of one
  address prefix (an IPv4 /24, an IPv6 /64) in a bucket and ``prefix_per_table`` in all, as
  eMule's Kad does. Loopback and private networks are exempt by default (their addresses are
  the operator's own: a laboratory testbed shares a /24); the limit applies to them when
  ``prefix_exempt`` is emptied. The simulator's integer addresses have no prefix.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from functools import lru_cache

from p2pdeploy.core import Address
from p2pdeploy.overlay.identity import PUBLIC_KEY_BYTES, Identity, node_id_of, verify
from p2pdeploy.wire import ID_BYTES, NodeId, message

CHALLENGE_CONTEXT = b"p2pdeploy contact v1\n"
NONCE_BYTES = 16
#: Loopback, private and link-local networks: exempt from the prefix limits by default.
DEFAULT_PREFIX_EXEMPT = ("127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16",
                         "::1/128", "fc00::/7", "fe80::/10")


@message(19)
class Challenge:
    """Prove that you hold the key your id is derived from: sign ``nonce`` (``sender`` asks)."""

    rpc_id: int
    sender: NodeId
    nonce: bytes


@message(20)
class ChallengeAnswer:
    """The answer to a challenge: the public key the sender's id is derived from, and its
    signature of the challenge (see :func:`challenge_payload`)."""

    rpc_id: int
    sender: NodeId
    public_key: bytes
    signature: bytes


def challenge_payload(nonce: bytes, challenger: int) -> bytes:
    """What an answer signs: the nonce, bound to the node that asked."""
    return CHALLENGE_CONTEXT + nonce + challenger.to_bytes(ID_BYTES, "big")


def answer(identity: Identity, msg: Challenge) -> ChallengeAnswer:
    return ChallengeAnswer(msg.rpc_id, identity.node_id, identity.public_key,
                           identity.sign(challenge_payload(msg.nonce, msg.sender)))


def proves(msg: ChallengeAnswer, node_id: int, nonce: bytes, challenger: int) -> bool:
    """True when ``msg`` proves that its sender holds the key of ``node_id``."""
    return (
        msg.sender == node_id
        and len(msg.public_key) == PUBLIC_KEY_BYTES
        and node_id_of(msg.public_key) == node_id
        and verify(msg.public_key, msg.signature, challenge_payload(nonce, challenger))
    )


class AddressPrefixes:
    """The prefix an address counts under for the limits, or ``None`` when it counts under none."""

    def __init__(self, exempt: Iterable[str] = DEFAULT_PREFIX_EXEMPT, v4_bits: int = 24, v6_bits: int = 64) -> None:
        self.exempt = tuple(ipaddress.ip_network(network) for network in exempt)
        self.v4_bits = v4_bits
        self.v6_bits = v6_bits
        self.prefix_of = lru_cache(maxsize=4096)(self._prefix_of)

    def _prefix_of(self, address: Address) -> str | None:
        if not isinstance(address, tuple):
            return None  # a simulator index
        try:
            ip = ipaddress.ip_address(address[0])
        except ValueError:
            return None  # a name, not an address: never in a table (replies come from addresses)
        if any(ip in network for network in self.exempt):
            return None
        bits = self.v4_bits if ip.version == 4 else self.v6_bits
        return str(ipaddress.ip_network((ip, bits), strict=False))
