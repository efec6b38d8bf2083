"""The signed registry of a merge group: who is online, who is merging right now (DHT key `{prefix}.members`).

hivemind's own `{prefix}.all_averagers` and matchmaking keys are unsigned: any peer can overwrite another's
entry (issue 16 switched honest nodes "alone" that way). The merging path therefore reads only this registry:
subkey = the writer's owner marker `[owner:<RSA public key>]`, value = msgpack `MergeMember`, signed by the
node's RSASignatureValidator like the rollout manifests, and accepted only when the key in the marker derives
the peer ID the record claims. A writer can add records only for itself; it cannot remove or change others'.

A member refreshes its record every round (TTL REGISTRY_TTL_S) and sets `merging_until_s` (DHT time) while it
looks for a group, which is what lets peers whose merge is not due join it (a reader ignores a time further
ahead than the longest window it would itself wait, so a record cannot claim "merging" for long).
"""

from __future__ import annotations

import dataclasses
import logging
import re

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils import get_dht_time
from pydantic import Field, StrictFloat, StrictStr
from typing import Annotated

from swarm_node.network import wire
from swarm_node.network.identity import peer_id_from_public_key

log = logging.getLogger(__name__)

REGISTRY_TTL_S = 300.0
_OWNER_RE = re.compile(RSASignatureValidator.PUBLIC_KEY_REGEX)


class MergeMember(wire._Message):
    """One member's registry record (protocols/PROTOCOL.md, merge section)."""

    peer_id: Annotated[StrictStr, Field(min_length=1, max_length=128)]
    mode: wire.Name
    fingerprint: wire.Fingerprint
    merges: wire.MergeLevel = 0
    merging_until_s: Annotated[StrictFloat, Field(ge=0, le=1e12, allow_inf_nan=False)] = 0.0


@dataclasses.dataclass
class Member:
    peer_id: str
    merges: int
    merging: bool


class MergeRegistry:
    """Writes this node's record and reads verified records of the others."""

    def __init__(self, dht, prefix: str, private_key, peer_id: str, mode: str, fingerprint: str, timeout_s: float,
                 max_merging_s: float = 600.0):
        self.dht, self.key, self.peer_id = dht, f"{prefix}.members", peer_id
        self.max_merging_s = max_merging_s  # a `merging_until_s` further ahead than this is not believed
        self.mode, self.fingerprint, self.timeout_s = mode, fingerprint, timeout_s
        self.marker = RSASignatureValidator(private_key).local_public_key
        self.rejected = 0  # records that failed the owner or schema check

    def announce(self, merges: int, merging_for_s: float = 0.0) -> bool:
        now = get_dht_time()
        record = MergeMember(version=wire.PROTOCOL_VERSION, peer_id=self.peer_id, mode=self.mode,
                             fingerprint=self.fingerprint, merges=min(max(merges, 0), wire.MAX_MERGE_LEVEL),
                             merging_until_s=now + merging_for_s if merging_for_s > 0 else 0.0)
        try:
            return bool(self.dht.store(self.key, wire.encode(record), now + REGISTRY_TTL_S, subkey=self.marker,
                                       return_future=True).result(timeout=self.timeout_s))
        except Exception as e:
            log.debug("announcing in the merge registry failed: %r", e)
            return False

    def members(self) -> list[Member] | None:
        """Verified records of other peers (None when the DHT could not be read)."""
        try:
            found = self.dht.get(self.key, latest=True, return_future=True).result(timeout=self.timeout_s)
        except Exception as e:
            log.debug("could not read the merge registry: %r", e)
            return None
        if found is None or not isinstance(found.value, dict):
            return []
        now, out = get_dht_time(), []
        for subkey, item in found.value.items():
            member = self._check(subkey, getattr(item, "value", None))
            if member is None:
                self.rejected += 1
            elif member.peer_id != self.peer_id:
                until = member.merging_until_s
                out.append(Member(member.peer_id, member.merges, now < until <= now + self.max_merging_s))
        return out

    def _check(self, subkey, value) -> MergeMember | None:
        owners = _OWNER_RE.findall(subkey) if isinstance(subkey, bytes) else []
        if len(owners) != 1 or not isinstance(value, bytes) or len(value) > wire.MAX_MERGE_MESSAGE_BYTES:
            return None
        try:
            signer = peer_id_from_public_key(owners[0]).to_base58()
            member = wire._decode(MergeMember, value, wire.MAX_MERGE_MESSAGE_BYTES)
        except Exception:
            return None
        if member.peer_id != signer or member.mode != self.mode or member.fingerprint != self.fingerprint:
            return None
        return member
