"""`swarm-node doctor`: why can't my node join? Each check prints one pass/fail line and, on failure, the fix.

The checks run against the node's own configuration (the same flags, file and `SWARM_NODE_*` variables as
`swarm-node run`), with a throw-away identity so that they never clash with a running node:

1. config: relay and mode options that contradict each other;
2. p2pd: hivemind's bundled go-libp2p daemon starts;
3. listen ports: every fixed port in `--host-maddrs` is free and bindable;
4. bootstrap peers: each one is dialled on its own, with its latency;
5. DHT: a ping to each reachable bootstrap peer measures the clock skew (hivemind refuses peers more than 3 s
   apart) and asks the peer to open a stream back to us (hivemind's own reachability check); our visible
   addresses tell whether we are only reachable on a private network (behind NAT);
6. peers: the rollout manifests in the DHT give the protocol versions peers speak, and a few payloads the
   reasoning-gym versions of their task specs;
7. memory: the node's memory estimate against the memory limit or the free memory;
8. disk: free space for checkpoints;
9. model: the configured model loads.

Exit status 0 when every check passes, 1 otherwise (2 for a config mistake, as every command).
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import shutil
import socket
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from swarm_node.config import NodeConfig

MAX_CLOCK_SKEW_S = 3.0  # hivemind.dht.protocol.MAX_DHT_TIME_DISCREPANCY_SECONDS
DIAL_TIMEOUT_S = 5.0
PAYLOADS_TO_READ = 3


@dataclasses.dataclass
class Check:
    """One check's outcome. `fix` says what to do when `ok` is False."""

    name: str
    ok: bool
    detail: str
    fix: str = ""
    skipped: bool = False


def _maddr_parts(maddr: str) -> dict[str, str]:
    parts = maddr.strip("/").split("/")
    return {parts[i]: parts[i + 1] for i in range(0, len(parts) - 1, 2)}


def check_options(config: NodeConfig) -> list[Check]:
    """Option combinations that cannot work (no network access needed)."""
    net = config.network
    problems = []
    if net.use_auto_relay and not net.use_relay:
        problems.append(("--use-auto-relay needs relays", "pass --use-relay, or drop --use-auto-relay"))
    if net.client_mode and not (net.initial_peers or net.initial_peers_file):
        problems.append(("a client-mode node cannot start a swarm: it accepts no connections",
                         "pass --initial-peers of a swarm to join, or drop --client-mode"))
    if net.client_mode and config.merge.merge_mode != "off":
        problems.append(("--client-mode with merging: hivemind averagers in client mode only send, they "
                         "never reduce a part", "run merging nodes without --client-mode"))
    public_bootstrap = [p for p in net.initial_peers if not _is_private(_maddr_parts(p).get("ip4") or
                                                                         _maddr_parts(p).get("ip6") or "")]
    listens_loopback_only = all(_is_loopback(_maddr_parts(m).get("ip4") or _maddr_parts(m).get("ip6") or "")
                                for m in net.host_maddrs)
    if public_bootstrap and listens_loopback_only and not net.client_mode:
        problems.append(("the bootstrap peers are on another machine but this node listens on loopback only, so "
                         "no peer can reach it", "listen on /ip4/0.0.0.0/tcp/PORT (and forward the port), or "
                         "pass --client-mode"))
    if not problems:
        return [Check("options", True, "relay, client-mode and address options are consistent")]
    return [Check("options", False, what, fix) for what, fix in problems]


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_private(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False  # a DNS name: assume public
    return address.is_private or address.is_loopback or address.is_link_local


def check_ports(host_maddrs: list[str]) -> list[Check]:
    """Bind every fixed TCP/UDP port of the listen addresses (port 0 means any free port: nothing to check)."""
    checks = []
    for maddr in host_maddrs:
        parts = _maddr_parts(maddr)
        host = parts.get("ip4") or parts.get("ip6")
        for proto, kind in (("tcp", socket.SOCK_STREAM), ("udp", socket.SOCK_DGRAM)):
            port = parts.get(proto)
            if host is None or port in (None, "0"):
                continue
            family = socket.AF_INET6 if "ip6" in parts else socket.AF_INET
            with socket.socket(family, kind) as s:
                try:
                    s.bind((host, int(port)))
                except OSError as e:
                    checks.append(Check(f"listen {maddr}", False, f"cannot bind {proto} port {port} on {host}: "
                                        f"{e.strerror}", "stop the program that holds it (`ss -ltnp`), pick another "
                                        "port in --host-maddrs, or use port 0 for a free one"))
                    continue
            checks.append(Check(f"listen {maddr}", True, f"{proto} port {port} on {host} is free"))
    if not checks:
        checks.append(Check("listen ports", True, "every listen address uses port 0 (a free port is chosen)"))
    return checks


async def _start_p2p(startup_timeout_s: float):
    from hivemind.p2p import P2P

    return await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], startup_timeout=startup_timeout_s)


async def check_network(config: NodeConfig) -> list[Check]:
    """p2pd start-up, dialling each bootstrap peer, clock skew, reachability and the peers' versions."""
    from hivemind.p2p import PeerID
    from hivemind.utils.multiaddr import Multiaddr

    net = config.network
    checks = []
    t0 = time.perf_counter()
    try:
        p2p = await _start_p2p(net.startup_timeout_s)
    except Exception as e:
        return [Check("p2pd", False, f"the p2p daemon did not start: {str(e).strip()[:200]}",
                      "reinstall hivemind (`pip install --force-reinstall hivemind==1.1.12`), check that its p2pd "
                      "binary runs on this CPU and OS, or raise --startup-timeout-s on a slow machine")]
    checks.append(Check("p2pd", True, f"the p2p daemon started in {time.perf_counter() - t0:.2f} s"))
    try:
        reachable = []
        if not net.initial_peers:
            checks.append(Check("bootstrap peers", True, "none given: this node starts a new swarm"))
        for maddr in net.initial_peers:
            parts = _maddr_parts(maddr)
            try:
                peer_id = PeerID.from_base58(parts["p2p"])
                t0 = time.perf_counter()
                address = Multiaddr(maddr).decapsulate(Multiaddr(f"/p2p/{parts['p2p']}"))
                await asyncio.wait_for(p2p._client.connect(peer_id, [address]), DIAL_TIMEOUT_S)
            except Exception as e:
                reason = "timed out" if isinstance(e, asyncio.TimeoutError) else str(e).strip()[:160]
                checks.append(Check(f"bootstrap {maddr}", False, f"cannot dial: {' '.join(reason.split())}",
                                    "check that the peer runs and that its address and port are right and open "
                                    "from this machine (firewall, port forwarding); copy the multiaddr it printed"))
                continue
            latency_ms = 1000 * (time.perf_counter() - t0)
            reachable.append((peer_id, maddr))
            checks.append(Check(f"bootstrap {maddr}", True, f"dialled in {latency_ms:.0f} ms"))
        if net.initial_peers and not reachable:
            checks.append(Check("join", False, "no bootstrap peer is reachable, so the node cannot join",
                                "fix at least one bootstrap peer (the daemon refuses to start with none)"))
        if reachable:
            checks += await _check_dht(p2p, reachable, config)
    finally:
        await p2p.shutdown()
    return checks


async def _check_dht(p2p, peers: list, config: NodeConfig) -> list[Check]:
    from hivemind.dht.crypto import RSASignatureValidator
    from hivemind.dht.node import DHTNode
    from hivemind.proto import dht_pb2
    from hivemind.utils import get_dht_time

    checks = []
    node = await DHTNode.create(p2p=p2p, initial_peers=[maddr for _, maddr in peers], client_mode=True,
                                record_validator=RSASignatureValidator())
    try:
        for peer, _ in peers:
            request = dht_pb2.PingRequest(peer=node.protocol.node_info, validate=True)
            t_request = get_dht_time()
            try:
                response = await node.protocol.get_stub(peer).rpc_ping(request, timeout=DIAL_TIMEOUT_S)
            except Exception as e:
                checks.append(Check(f"DHT ping {peer}", False, f"no DHT answer: {str(e)[:120]}",
                                    "the peer is not a swarm-node/hivemind DHT peer, or it is overloaded"))
                continue
            t_response = get_dht_time()
            skew_s = response.dht_time - (t_request + t_response) / 2
            ok = abs(skew_s) <= MAX_CLOCK_SKEW_S - (t_response - t_request) / 2
            checks.append(Check(f"clock vs {peer}", ok, f"skew {skew_s:+.2f} s (hivemind allows +-{MAX_CLOCK_SKEW_S:.0f} s)",
                                "synchronise this machine's clock (e.g. `timedatectl set-ntp true` or chrony)"))
        visible = [str(a) for a in await p2p.get_visible_maddrs(latest=True)]
        hosts = [_maddr_parts(a).get("ip4") or _maddr_parts(a).get("ip6") or "" for a in visible]
        remote = [str(p) for p in config.network.initial_peers if not _is_private(_maddr_parts(p).get("ip4") or "")]
        if remote and all(_is_private(h) for h in hosts):
            checks.append(Check("reachability", False, "this machine has only private addresses "
                                f"({', '.join(sorted(set(hosts)))}) while its bootstrap peers are public: it is behind "
                                "NAT", "forward the listen port and pass --announce-maddrs /ip4/PUBLIC_IP/tcp/PORT, or "
                                "use --use-auto-relay, or run with --client-mode"))
        else:
            checks.append(Check("reachability", True, "the bootstrap peers are on this machine's network"
                                if not remote else "this machine has a public address"))
        checks += await _check_versions(node, p2p, config)
    finally:
        await node.shutdown()
    return checks


async def _check_versions(node, p2p, config: NodeConfig) -> list[Check]:
    """Protocol versions of the peers' manifests and reasoning-gym versions of a few payloads."""
    from swarm_node.learning.tasks import RG_VERSION
    from swarm_node.network import wire
    from swarm_node.network.exchange import FetchError, RecordError, RolloutExchange, rollout_key

    net = config.network
    manifests = []
    for shard in range(net.num_shards):
        try:
            found = await asyncio.wait_for(node.get(rollout_key(net.swarm_name, shard), latest=True), DIAL_TIMEOUT_S)
        except Exception:
            continue
        if found is None or not isinstance(found.value, dict):
            continue
        for subkey, item in found.value.items():
            try:
                manifests.append(RolloutExchange._check_record(subkey, item.value))
            except RecordError:
                continue
    if not manifests:
        return [Check("peer versions", True, f"no peer has published in swarm {net.swarm_name!r} yet", skipped=True)]
    majors = {m.version for m in manifests}
    ours = wire.PROTOCOL_VERSION
    other_major = sorted(v for v in majors if v[0] != ours[0])
    checks = [Check("protocol", not other_major,
                    f"{len(manifests)} peers publish protocol {', '.join('.'.join(map(str, v)) for v in sorted(majors))}; "
                    f"this node speaks {ours[0]}.{ours[1]}",
                    "upgrade or downgrade swarm-node to the swarm's protocol major version")]
    exchange = RolloutExchange.__new__(RolloutExchange)  # only its fetch path: no DHT process needed
    exchange.p2p, exchange.config, exchange.bytes_in = p2p, net, 0
    versions: dict[str, int] = {}
    for manifest in [m for m in manifests if m.num_groups > 0][:PAYLOADS_TO_READ]:
        try:
            payload = await exchange.fetch(manifest, net.max_payload_bytes)
        except FetchError:
            continue
        for group in payload.groups:
            versions[group.spec.rg_version] = versions.get(group.spec.rg_version, 0) + 1
    if versions:
        others = sorted(v for v in versions if v != RG_VERSION)
        checks.append(Check("reasoning-gym", not others, f"peers' task specs use reasoning-gym "
                            f"{', '.join(sorted(versions))}; this node has {RG_VERSION}",
                            f"install reasoning-gym=={others[0] if others else RG_VERSION} to verify their groups"))
    return checks


def check_memory(config: NodeConfig) -> Check:
    import psutil

    from swarm_node.learning.models import estimate_memory_mb
    from swarm_node.network.merging import param_copies

    t = config.train
    need_mb = estimate_memory_mb(t.model, t.micro_batch_size, t.num_local_groups * t.num_completions,
                                 t.max_new_tokens, extra_param_copies=param_copies(config.merge),
                                 optimizer=t.optimizer)
    limit_mb = t.memory_limit_mb or psutil.virtual_memory().available / 2**20
    what = "--memory-limit-mb" if t.memory_limit_mb else "available memory"
    return Check("memory", need_mb <= limit_mb, f"needs about {need_mb / 1024:.2f} GB; {what} {limit_mb / 1024:.2f} GB",
                 "lower --micro-batch-size, --num-local-groups x --num-completions or --max-new-tokens, use "
                 "--optimizer adafactor, or use a smaller --model")


def check_disk(config: NodeConfig, num_params: int | None) -> Check:
    out = Path(config.output_dir)
    probe = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    free_mb = shutil.disk_usage(probe).free / 2**20
    if not config.checkpoint_every_rounds:
        return Check("disk", True, f"{free_mb / 1024:.1f} GB free; checkpoints are off")
    if num_params is None:
        return Check("disk", free_mb > 1024, f"{free_mb / 1024:.1f} GB free at {probe}",
                     "free disk space or point --output-dir elsewhere")
    state_bytes = 4 + (8 if config.train.optimizer == "adamw" else 0)  # fp32 weights + optimizer moments
    need_mb = num_params * state_bytes * (config.checkpoint_keep + 1) / 2**20  # +1: the one being written
    return Check("disk", free_mb >= need_mb, f"checkpoints need about {need_mb / 1024:.2f} GB "
                 f"({config.checkpoint_keep} kept + 1 being written); {free_mb / 1024:.1f} GB free at {probe}",
                 "free disk space, point --output-dir elsewhere, lower --checkpoint-keep or use --optimizer adafactor")


def check_model(config: NodeConfig) -> tuple[Check, int | None]:
    from swarm_node.errors import OperatorError
    from swarm_node.learning.models import load_policy

    t0 = time.perf_counter()
    try:
        policy = load_policy(config.train.model, config.train.seed, config.train.precision)
    except OperatorError as e:
        return Check("model", False, str(e), "see the message: pass an existing --model"), None
    except Exception as e:  # a broken file or install: still one line
        return Check("model", False, f"{config.train.model} failed to load: {str(e)[:200]}",
                     "reinstall (`bash scripts/install.sh`) or pass another --model"), None
    num_params = sum(p.numel() for p in policy.model.parameters())
    return Check("model", True, f"{policy.name} loaded in {time.perf_counter() - t0:.1f} s "
                 f"({num_params / 1e6:.1f}M parameters)"), num_params


def run_checks(config: NodeConfig, load_model: bool = True) -> list[Check]:
    """Every check, in order. Never raises for a failing check; each failure is a `Check` with its fix."""
    checks = check_options(config) + check_ports(config.network.host_maddrs)
    import uvloop

    checks += uvloop.run(check_network(config))
    checks.append(check_memory(config))
    num_params = None
    if load_model:
        model_check, num_params = check_model(config)
        checks.append(model_check)
    checks.append(check_disk(config, num_params))
    return checks


def print_checks(checks: list[Check], console: Console | None = None) -> bool:
    """Print one line per check (and the fix under a failure). Returns whether every check passed."""
    console = console or Console(highlight=False)
    for c in checks:
        mark = "[yellow]SKIP[/]" if c.skipped else "[green]PASS[/]" if c.ok else "[red]FAIL[/]"
        console.print(f"{mark} {escape(c.name)}: {escape(c.detail)}", soft_wrap=True)
        if not c.ok:
            console.print(f"     fix: {escape(c.fix)}", soft_wrap=True)
    failed = [c for c in checks if not c.ok]
    console.print(f"{len(checks) - len(failed)} of {len(checks)} checks passed" +
                  (f"; {len(failed)} failed" if failed else ""))
    return not failed


def doctor(config: NodeConfig, load_model: bool = True) -> int:
    """The `swarm-node doctor` command: 0 when every check passes, else 1."""
    return 0 if print_checks(run_checks(config, load_model)) else 1
