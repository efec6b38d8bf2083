"""The dashboard's JSON endpoints and page, each on its own, served by the real Telemetry object over real HTTP; and
the HTTP server against slow and hostile clients (swarm_node/dashboard/)."""

import asyncio
import json
import random
import re
import socket
import time
import urllib.error
import urllib.request

import pytest

from swarm_node.config import NetworkConfig, TrainConfig
from swarm_node.dashboard.api import MAX_PEERS, MAX_ROUNDS, STATIC, DashboardApi, page_weight_bytes
from swarm_node.dashboard.http import HttpServer

STATIC_JS = "/static/vendor/uplot/uPlot.iife.min.js"
from swarm_node.learning.tasks import TaskSet
from swarm_node.network.collector import Collector, CollectorSettings
from swarm_node.records import EvalRecord, RoundRecord
from swarm_node.telemetry import Telemetry

from hostile import honest_payload
from rounds import round_line


def metrics_line(r: int, rejected: dict | None = None, merge: str | None = None) -> dict:
    """A metrics.jsonl line with the fields the node writes (a RoundRecord)."""
    line = round_line(r, reward_local_mean=r / 10, reward_train_mean=r / 20, rejected=rejected or {},
                      bytes_in=100 * r, bytes_out=90 * r)
    if merge:
        line.update(merge_outcome=merge, merge_s=0.2, merge_group_size=2)
    return line


@pytest.fixture
def served():
    telemetry = Telemetry()
    port = telemetry.serve("127.0.0.1", 0)
    yield telemetry, f"http://127.0.0.1:{port}"
    telemetry.close()


def get(url: str) -> tuple[int, dict, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def get_json(url: str) -> dict:
    status, headers, body = get(url)
    assert status == 200 and headers["Content-Type"] == "application/json", (status, body[:200])
    assert headers["Access-Control-Allow-Origin"] == "*"  # node0's page reads its siblings' endpoints
    return json.loads(body)


def test_rounds_endpoint_series_rejections_per_round_and_bounds(served):
    telemetry, url = served
    telemetry.info.update(peer_id="QmSelf", model="tiny", round=0)
    assert get_json(url + "/api/rounds")["rounds"] == []
    telemetry.observe_round(RoundRecord(**metrics_line(1)), 0)
    telemetry.observe_round(RoundRecord(**metrics_line(2, {"reward_mismatch": 2}, merge="merged")), 3)
    telemetry.observe_round(RoundRecord(**metrics_line(3, {"reward_mismatch": 3, "stale": 1}, merge="failed")), 5)
    data = get_json(url + "/api/rounds")
    assert data["peer_id"] == "QmSelf" and [r["round"] for r in data["rounds"]] == [1, 2, 3]
    r1, r2, r3 = data["rounds"]
    assert (r2["external_groups_available"], r2["external_groups_used"], r2["external_peer_ids"]) == (3, 2, ["QmOther"])
    # cumulative counts in metrics.jsonl become this round's new rejections by reason
    assert r1["rejected_new"] == {} and r2["rejected_new"] == {"reward_mismatch": 2}
    assert r3["rejected_new"] == {"reward_mismatch": 1, "stale": 1}
    assert (r1["merge_outcome"], r2["merge_outcome"], r3["merge_outcome"]) == (None, "merged", "failed")
    assert r3["generate_s"] == 0.4 and r3["train_s"] == 0.3 and r3["rss_mb"] > 10 and r3["peak_rss_mb"] == 900.0
    assert [r["round"] for r in get_json(url + "/api/rounds?since=1")["rounds"]] == [2, 3]
    assert [r["round"] for r in get_json(url + "/api/rounds?last=1")["rounds"]] == [3]
    assert get_json(url + "/api/rounds?since=3")["rounds"] == []
    status, _, body = get(url + "/api/rounds?last=many")
    assert status == 400 and b"last" in body
    for r in range(4, MAX_ROUNDS + 50):  # memory and answers stay bounded however long the node runs
        telemetry.observe_round(RoundRecord(**metrics_line(r)), 5)
    rows = get_json(url + f"/api/rounds?last={10 * MAX_ROUNDS}")["rounds"]
    assert len(rows) == MAX_ROUNDS and rows[-1]["round"] == MAX_ROUNDS + 49


def test_eval_endpoint_and_history_of_a_resumed_node(served, tmp_path):
    telemetry, url = served
    assert get_json(url + "/api/eval")["evals"] == []
    for r, acc in ((0, 0.1), (2, 0.25)):
        telemetry.observe_eval(EvalRecord(round=r, heldout_accuracy=acc, num_questions=8, heldout_by_task={},
                                          eval_s=1.5, time_s=time.time()))
    evals = get_json(url + "/api/eval")["evals"]
    assert [(e["round"], e["heldout_accuracy"], e["num_questions"]) for e in evals] == [(0, 0.1, 8), (2, 0.25, 8)]
    assert [e["round"] for e in get_json(url + "/api/eval?since=0")["evals"]] == [2]
    # a restarted node shows its earlier rounds: the series are filled from metrics.jsonl and eval.jsonl
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(metrics_line(r, {"stale": r})) + "\n" for r in (1, 2))
                                            + '{"round": 3, "torn')
    (tmp_path / "eval.jsonl").write_text(json.dumps({"round": 2, "heldout_accuracy": 0.5}) + "\n")
    resumed = Telemetry()
    resumed.load_history(tmp_path)
    assert [(r["round"], r["rejected_new"]) for r in resumed.rows] == [(1, {"stale": 1}), (2, {"stale": 1})]
    assert [e["heldout_accuracy"] for e in resumed.evals] == [0.5]


class OnePoll:
    """The exchange's poll interface at the network boundary: the given manifests, once."""

    def __init__(self, manifests):
        self.manifests = manifests

    async def poll(self, shards=None):
        manifests, self.manifests = self.manifests, []
        return manifests, []


def test_peers_endpoint_from_a_real_collector(served):
    from hivemind.utils import get_dht_time

    from swarm_node.network import wire

    telemetry, url = served
    taskset = TaskSet("smol", [], -1, 0, 100_000)
    manifests = [wire.Manifest.model_construct(
        version=wire.PROTOCOL_VERSION, peer_id=p, round=r, policy_version=r - 1, model="tiny", num_groups=0,
        num_completions=0, payload_bytes=0, payload_sha256=bytes(32), created_at_s=get_dht_time() - 10 + r)
        for p, r in (("QmHonest", 7), ("QmForger", 7), ("QmHonest", 3))]  # an older manifest in another shard
    collector = Collector(OnePoll(manifests), CollectorSettings.pick(NetworkConfig(ban_strikes=2),
                                                                     TrainConfig(model="tiny")), random.Random(0))
    asyncio.run(collector.collect_once())  # both announce themselves (round 7, model tiny)
    assert len(collector.verify_payload(honest_payload("QmHonest", 7, taskset, range(3)))) == 3
    for i in range(2):  # two forged rewards: two strikes, banned
        forged = honest_payload("QmForger", 7, taskset, range(10 + i, 11 + i), rewards=[1.0, 1.0, 1.0, 1.0])
        assert collector.verify_payload(forged) is None
    collector.trust.reject("malformed", "QmNeverAnnounced")
    assert get_json(url + "/api/peers")["peers"] == []  # nothing until the node takes a snapshot
    telemetry.refresh_peers(collector)
    data = get_json(url + "/api/peers")
    assert data["known_peers"] == 3
    by_id = {p["peer_id"]: p for p in data["peers"]}
    honest, forger, unknown = by_id["QmHonest"], by_id["QmForger"], by_id["QmNeverAnnounced"]
    assert (honest["model"], honest["last_round"], honest["policy_version"]) == ("tiny", 7, 6)
    assert honest["accepted_groups"] == 3 and honest["rejected"] == {} and not honest["banned"]
    assert 2 < honest["age_s"] < 60  # the newest manifest's age
    assert forger["rejected"] == {"reward_mismatch": 2} and forger["banned"] and forger["accepted_groups"] == 0
    assert unknown["model"] is None and unknown["age_s"] is None and unknown["rejected"] == {"malformed": 1}
    assert data["peers"][-1]["peer_id"] == "QmNeverAnnounced"  # peers heard from recently come first
    for i in range(3 * MAX_PEERS):  # a Sybil crowd: the answer stays bounded
        collector.trust.reject("malformed", f"QmSybil{i}")
    telemetry.refresh_peers(collector)
    data = get_json(url + "/api/peers")
    assert len(data["peers"]) == MAX_PEERS and data["known_peers"] > MAX_PEERS
    assert {"QmHonest", "QmForger"} <= {p["peer_id"] for p in data["peers"]}


def test_swarm_endpoint_lists_sibling_nodes(tmp_path):
    for i, url in enumerate(["http://127.0.0.1:9101", "http://127.0.0.1:9102", None]):
        (tmp_path / f"node{i}").mkdir()
        (tmp_path / f"node{i}" / "node.json").write_text(json.dumps({"peer_id": f"Qm{i}", "metrics_url": url}))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "node.json").write_text("not json")
    telemetry = Telemetry()
    telemetry.info["output_dir"] = str(tmp_path / "node1")
    port = telemetry.serve("127.0.0.1", 0)
    try:
        nodes = get_json(f"http://127.0.0.1:{port}/api/swarm")["nodes"]
    finally:
        telemetry.close()
    # node2 runs with its endpoint off and junk is no node.json: both skipped
    assert [(n["label"], n["port"], n["self"]) for n in nodes] == [("node0", 9101, False), ("node1", 9102, True)]


def test_page_and_static_files_are_served_with_relative_urls_only(served):
    _, url = served
    status, headers, html = get(url + "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    referenced = re.findall(rb'(?:src|href)="([^"]+)"', html)
    assert b"static/vendor/uplot/uPlot.iife.min.js" in referenced and b"static/dashboard.js" in referenced
    for ref in referenced:
        if ref.startswith(b"data:"):  # inline (the empty favicon)
            continue
        assert not re.match(rb"^(https?:)?//", ref), ref  # nothing from a CDN, no hard-coded host
        status, _, body = get(url + "/" + ref.decode())
        assert status == 200 and body, ref
    for path in STATIC:  # the page's own files fetch nothing by absolute URL (hosts come from location)
        _, _, body = get(url + path)
        assert b"cdn" not in body.lower(), path
        if "vendor" not in path:
            assert not re.search(rb"https?://", body), path
    _, _, licence = get(url + "/static/vendor/uplot/LICENSE")
    assert b"MIT License" in licence
    assert page_weight_bytes() == sum(len(get(url + p)[2]) for p in STATIC if not p.endswith("LICENSE"))
    status, _, _ = get(url + "/no/such/page")
    assert status == 404
    request = urllib.request.Request(url + "/api/rounds", data=b"x", method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=5)
    assert e.value.code == 405  # read-only


def test_slow_and_hostile_clients_do_not_stall_the_server():
    telemetry = Telemetry()
    server = HttpServer(DashboardApi(telemetry).route, head_timeout_s=1.0, write_timeout_s=1.0, max_connections=64)
    port = server.start("127.0.0.1", 0)
    url = f"http://127.0.0.1:{port}"
    socks = []
    try:
        for _ in range(40):  # connections that never send a byte
            socks.append(socket.create_connection(("127.0.0.1", port)))
        slow = socket.create_connection(("127.0.0.1", port))  # a request head sent byte by byte, never finished
        socks.append(slow)
        for _ in range(8):  # clients that ask and never read (the answer sits in buffers or times out)
            s = socket.create_connection(("127.0.0.1", port))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
            s.sendall(b"GET /static/vendor/uplot/uPlot.iife.min.js HTTP/1.1\r\nHost: x\r\n\r\n")
            socks.append(s)
        big = socket.create_connection(("127.0.0.1", port))  # a head larger than the limit
        big.sendall(b"GET / HTTP/1.1\r\n" + b"X-Junk: " + b"a" * 40000 + b"\r\n\r\n")
        socks.append(big)
        for i in range(6):
            slow.send(b"GET /healthz"[i:i + 1])
            status, _, body = get(url + "/healthz")  # answered while all of the above hang around
            assert status == 200 and json.loads(body)["ok"], body
        for _ in range(30):  # more than max_connections at once: the extra ones are closed on accept
            socks.append(socket.create_connection(("127.0.0.1", port)))
        deadline = time.monotonic() + 5
        while server.refused_connections == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.refused_connections > 0
        deadline = time.monotonic() + 10
        while server.open_connections > 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert server.open_connections == 0  # every idle or slow connection was timed out and closed
        assert server.timed_out_connections >= 40
        assert get(url + "/healthz")[0] == 200
    finally:
        for s in socks:
            s.close()
        server.close()


def test_serves_when_started_from_a_running_event_loop_and_reports_a_busy_port():
    telemetry = Telemetry()

    async def start():  # the node starts its endpoint from inside its own event loop
        return telemetry.serve("127.0.0.1", 0)

    port = asyncio.run(start())
    try:
        assert get(f"http://127.0.0.1:{port}/healthz")[0] == 200
        with pytest.raises(OSError):  # the node turns this into a NetworkError with the fix
            Telemetry().serve("127.0.0.1", port)
    finally:
        telemetry.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2)  # closed: nothing listens any more


def test_a_slow_reader_gets_the_whole_answer(served):
    _, url = served
    port = int(url.rsplit(":", 1)[1])
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    s.sendall(b"GET /static/vendor/uplot/uPlot.iife.min.js HTTP/1.1\r\nHost: x\r\n\r\n")
    time.sleep(1.0)  # the answer waits in buffers meanwhile
    data = b""
    while chunk := s.recv(1024):  # then read it slowly, to the end
        data += chunk
        time.sleep(0.001)
    s.close()
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(re.search(rb"content-length: (\d+)", head.lower()).group(1))
    assert head.startswith(b"HTTP/1.1 200") and len(body) == length == len(get(url + STATIC_JS)[2]) > 50_000
