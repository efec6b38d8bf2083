"""Joining the swarm: checking addresses, starting hivemind's DHT with retries and a hard deadline, and turning its
failures into one actionable `NetworkError`.

hivemind reports start-up failures only as text, so `explain_join_failure` classifies the daemon's text, once,
into (message, retryable); the retry loop decides on `retryable`, never on the wording of a message of ours.
`DHT(start=True)` waits for the DHT process without a timeout, and under load that process was seen to never
become ready (tests/test_errors.py, the 1 ms start-up timeout case). So the DHT is started with
`start=False` and `run_in_background(timeout=...)`: past `startup_timeout_s + JOIN_DEADLINE_MARGIN_S` the attempt
is abandoned, its processes are killed, and it counts as a retryable failure like any other.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import psutil

from swarm_node.errors import OperatorError
from swarm_node.processes import kill_and_wait

log = logging.getLogger("swarm_node")
JOIN_BACKOFF_S, JOIN_BACKOFF_MAX_S = 2.0, 10.0  # wait before join retry k: 2 s * 2^k, at most 10 s
JOIN_DEADLINE_MARGIN_S = 60.0  # beyond --startup-timeout-s: the DHT process's own start-up and bootstrap


class NetworkError(OperatorError):
    """The node cannot join the swarm (daemon start, bootstrap peers, addresses); the message says what to do."""


class DhtStartHung(Exception):
    """hivemind's DHT process did not report ready (or failed) within the hard deadline."""


def check_multiaddrs(addrs: list[str], what: str, need_peer_id: bool) -> None:
    """Raise NetworkError with a fix-it message for a malformed multiaddr."""
    from hivemind.utils.multiaddr import Multiaddr

    for addr in addrs:
        try:
            parsed = Multiaddr(addr)
        except Exception as e:
            raise NetworkError(f"{what} {addr!r} is not a valid multiaddr ({e}); expected e.g. "
                               "/ip4/127.0.0.1/tcp/31337/p2p/Qm...") from None
        if need_peer_id and "/p2p/" not in str(parsed):
            raise NetworkError(f"{what} {addr!r} has no /p2p/<peer ID> part; copy the full multiaddr the peer printed")


def check_addresses(net: Any) -> None:
    """Check the multiaddrs of `net` (the NetworkConfig) before anything starts. Raises NetworkError."""
    check_multiaddrs(net.initial_peers, "bootstrap peer", need_peer_id=True)
    check_multiaddrs(net.host_maddrs, "listen address", need_peer_id=False)
    check_multiaddrs(net.announce_maddrs, "announce address", need_peer_id=False)


@dataclasses.dataclass(frozen=True)
class JoinFailure:
    """Why one attempt to start the DHT failed: one actionable sentence, and whether another attempt can help."""

    message: str
    retryable: bool


def explain_join_failure(e: BaseException, net: Any, identity_path: Path, deadline_s: float,
                         initial_peers: list[str] | None = None) -> JoinFailure:
    """Classify a DHT start-up failure. `net` is the node's NetworkConfig (initial_peers, initial_peers_file,
    host_maddrs, startup_timeout_s); `initial_peers` the bootstrap multiaddrs actually dialled (default
    `net.initial_peers`). Only the exception's text is matched, never a message built here. An unreachable bootstrap
    peer named on the command line is final; one read from `initial_peers_file` is retried, since the file may be a
    stopped peer's and be rewritten when that peer restarts."""
    if isinstance(e, DhtStartHung):
        return JoinFailure(f"the DHT process did not start within {deadline_s:.0f} s (hivemind's start-up hung, "
                           "seen on an overloaded machine); raise --startup-timeout-s, or check that hivemind's p2pd "
                           "binary runs on this machine", True)
    text = str(e)
    low = text.lower()
    if "already taken" in text:
        return JoinFailure(f"identity {identity_path} is already used by another peer in the swarm; pass another "
                           "--identity-path", False)
    if "address already in use" in low:
        return JoinFailure(f"a listen address in {net.host_maddrs} is already in use; pick another port or use "
                           "tcp/0", False)
    peers = list(net.initial_peers) if initial_peers is None else initial_peers
    if peers and ("bootstrap" in low or "failed to connect" in low or "dial" in low):
        from_file = bool(net.initial_peers_file) and not set(peers) <= set(net.initial_peers)
        source = f" (read from {net.initial_peers_file})" if from_file else ""
        return JoinFailure(f"could not reach any bootstrap peer in {peers}{source}: check that the peer is "
                           f"running, the address and port are right and reachable from here ({text.strip()[:200]})",
                           from_file)
    if "failed to start" in low:
        return JoinFailure(f"the p2p daemon did not start within {net.startup_timeout_s:.0f} s ({text.strip()[:200]}); "
                           "raise --startup-timeout-s or check that hivemind's p2pd binary runs on this machine", True)
    return JoinFailure(f"could not join the swarm: {text.strip()[:300]}", True)


def _start_dht(kwargs: dict[str, Any], deadline_s: float):
    """A started hivemind DHT, or DhtStartHung after `deadline_s` (the caller kills the attempt's processes)."""
    from hivemind import DHT

    dht = DHT(start=False, **kwargs)
    try:
        dht.run_in_background(await_ready=True, timeout=deadline_s)
    except TimeoutError:  # concurrent.futures.TimeoutError is TimeoutError since Python 3.11
        raise DhtStartHung() from None
    return dht


async def start_dht(net: Any, identity_path: Path, validator, initial_peers: list[str],
                    reload_peers: Callable[[], Awaitable[list[str]]] | None = None):
    """Start hivemind's DHT with `net.startup_retries` retries, waiting JOIN_BACKOFF_S * 2^k (at most
    JOIN_BACKOFF_MAX_S) before retry k; a failed attempt's processes are killed.

    Args:
        net: the node's NetworkConfig.
        validator: the record validator (signatures) the DHT checks every record with.
        reload_peers: re-reads the bootstrap multiaddrs before each retry (the `initial_peers_file` case).
    Raises:
        NetworkError: every attempt failed, or one failed for a reason a retry cannot fix.
    """
    kwargs: dict[str, Any] = dict(
        initial_peers=initial_peers or None,
        host_maddrs=net.host_maddrs,
        identity_path=str(identity_path),
        client_mode=net.client_mode,
        record_validators=[validator],
        startup_timeout=net.startup_timeout_s,
        num_replicas=net.dht_replicas,
        use_relay=net.use_relay,
        use_auto_relay=net.use_auto_relay,
    )
    if net.announce_maddrs:
        kwargs["announce_maddrs"] = net.announce_maddrs
    deadline_s = net.startup_timeout_s + JOIN_DEADLINE_MARGIN_S
    before = child_pids()
    for attempt in range(net.startup_retries + 1):
        try:
            dht = await asyncio.get_running_loop().run_in_executor(None, _start_dht, kwargs, deadline_s)
            break
        except Exception as e:
            failure = explain_join_failure(e, net, identity_path, deadline_s, initial_peers)
            kill_and_wait(new_children(before), grace_s=0)
            if attempt == net.startup_retries or not failure.retryable:
                raise NetworkError(failure.message) from None
            backoff_s = min(JOIN_BACKOFF_MAX_S, JOIN_BACKOFF_S * 2**attempt)
            log.warning("joining failed (attempt %d of %d): %s; retrying in %.0f s", attempt + 1,
                        net.startup_retries + 1, failure.message, backoff_s)
            await asyncio.sleep(backoff_s)
            if reload_peers is not None:
                initial_peers = await reload_peers()
                kwargs["initial_peers"] = initial_peers or None
    return dht


def child_pids() -> set[int]:
    """PIDs of this process's descendants now (to tell which ones a later step started)."""
    return {p.pid for p in psutil.Process().children(recursive=True)}


async def wait_for_peers(exchange, min_peers: int, timeout_s: float, stopping) -> None:
    """Wait until `min_peers` peers have announced themselves (at most `timeout_s`; 0 peers: return at once).

    A peer counts once it has published a manifest (it publishes after loading its model), not when its DHT first
    connects, which can be many seconds before it is ready to exchange rollouts.
    """
    if not min_peers:
        return
    deadline = time.monotonic() + timeout_s
    while not stopping() and time.monotonic() < deadline:
        manifests, _ = await exchange.poll()
        if len({m.peer_id for m in manifests}) >= min_peers:
            return
        await asyncio.sleep(0.5)
    log.warning("fewer than %d peers after %.0f s (min_peers_timeout_s); starting anyway", min_peers, timeout_s)


def new_children(before: set[int]) -> list[psutil.Process]:
    """This process's descendants whose PIDs are not in `before`."""
    return [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
