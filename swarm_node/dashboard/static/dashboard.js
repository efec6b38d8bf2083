// swarm-node dashboard: polls this node's JSON endpoints (and its local siblings', found through /api/swarm)
// every POLL_MS and updates the page in place. Relative URLs only, so it works from another machine.
"use strict";
const POLL_MS = 2000, SWARM_EVERY = 5, MAX_ROWS = 1000, FETCH_TIMEOUT_MS = 1800;
const COLORS = ["#2b5fd9", "#d9482b", "#1e9e5a", "#9b3fd1", "#d19a1f", "#1fa3b8", "#c2407e", "#5d6b7d"];
const LOCAL_HOSTS = ["127.0.0.1", "localhost", "0.0.0.0", "::", "[::]", "[::1]", "::1"];
const S = { nodes: [], selected: null, data: {}, charts: {}, tick: 0, selfHost: null };

function $(id) { return document.getElementById(id); }
function el(tag, text, cls) { const e = document.createElement(tag); if (text !== undefined) e.textContent = text; if (cls) e.className = cls; return e; }
function fmt(v, d = 3) { return v === null || v === undefined ? "-" : (typeof v === "number" ? +v.toFixed(d) : String(v)); }

async function getJSON(url) {
  const c = new AbortController();
  const t = setTimeout(() => c.abort(), FETCH_TIMEOUT_MS);
  try {
    const r = await fetch(url, { signal: c.signal, cache: "no-store" });
    if (!r.ok && r.status !== 503) throw new Error(`${url}: HTTP ${r.status}`);
    return await r.json();
  } finally { clearTimeout(t); }
}

// where a sibling's endpoints are: this page's own node is "" (relative); a sibling bound to the same or a local
// address is reached on this page's host with its own port; anything else by its recorded URL
function baseFor(node) {
  if (node.self) return "";
  const u = new URL(node.metrics_url);
  if (LOCAL_HOSTS.includes(u.hostname) || u.hostname === S.selfHost) return `${location.protocol}//${location.hostname}:${u.port}/`;
  return node.metrics_url.replace(/\/?$/, "/");
}

async function refreshSwarm() {
  let nodes = [];
  try { nodes = (await getJSON("api/swarm")).nodes || []; } catch (e) { /* keep the old list */ return; }
  const me = nodes.find(n => n.self);
  if (!me) nodes = [{ label: "this node", self: true, metrics_url: location.href, port: +location.port }, ...nodes];
  else S.selfHost = new URL(me.metrics_url).hostname;
  S.nodes = nodes.map(n => ({ ...n, base: baseFor(n) }));
  for (const n of S.nodes) S.data[n.label] = S.data[n.label] || { rounds: [], evals: [], status: null, peers: null, up: false };
  if (!S.selected || !S.data[S.selected]) S.selected = (me || S.nodes[0]).label;
  renderNav();
}

async function pollNode(n) {
  const d = S.data[n.label];
  const last = d.rounds.length ? d.rounds[d.rounds.length - 1].round : -1;
  const lastEval = d.evals.length ? d.evals[d.evals.length - 1].round : -1;
  const wantPeers = n.label === S.selected;
  const [status, rounds, evals, peers] = await Promise.allSettled([
    getJSON(n.base + "status"), getJSON(`${n.base}api/rounds?since=${last}&last=${MAX_ROWS}`),
    getJSON(`${n.base}api/eval?since=${lastEval}`), wantPeers ? getJSON(n.base + "api/peers") : Promise.resolve(null)]);
  d.up = status.status === "fulfilled";
  if (d.up) {
    if (d.status && status.value.round < (d.status.round || 0)) { d.rounds = []; d.evals = []; }  // restarted fresh
    d.status = status.value;
  }
  if (rounds.status === "fulfilled") d.rounds = d.rounds.concat(rounds.value.rounds).slice(-MAX_ROWS);
  if (evals.status === "fulfilled") d.evals = d.evals.concat(evals.value.evals).slice(-MAX_ROWS);
  if (wantPeers && peers.status === "fulfilled") d.peers = peers.value;
}

function renderNav() {
  const nav = $("nodes");
  nav.replaceChildren(...S.nodes.map(n => {
    const b = el("button", n.label);
    b.className = (n.label === S.selected ? "selected" : "") + (S.data[n.label] && !S.data[n.label].up && S.tick ? " down" : "");
    b.onclick = () => { S.selected = n.label; renderNav(); render(); };
    return b;
  }));
}

// one uPlot per element, re-created when its series change; data is [xs, ys1, ys2, ...]
function plot(id, names, data, opts = {}) {
  const box = $(id), key = names.join("\u0000");
  let c = S.charts[id];
  if (!c || c.key !== key) {
    if (c) c.u.destroy();
    const series = [{ label: opts.x || "round" }, ...names.map((name, i) => ({
      label: name, stroke: COLORS[i % COLORS.length], width: 2, spanGaps: true, points: { size: 5 } }))];
    // y from 0: a fraction up to at least 1, a count or a time up to at least 1 (flat zero lines stay readable)
    const y = opts.y === "auto" ? {} : { range: (u, lo, hi) => [Math.min(0, lo ?? 0), Math.max(hi ?? 0, 1) * (opts.y === "fraction" ? 1 : 1.05)] };
    const u = new uPlot({ width: Math.max(300, box.clientWidth - 4), height: 220, series,
      scales: { x: { time: false }, y }, axes: [{ label: opts.x || "round" }, {}], legend: { live: true } }, data, box);
    c = S.charts[id] = { u, key };
  } else c.u.setData(data);
  box.dataset.points = String(data[0].length);
}

function joinSeries(tables) {  // [[xs, ys], ...] -> aligned [xs, ys1, ys2, ...] (nulls where a node has no point)
  if (!tables.length) return [[]];
  return uPlot.join(tables);
}

function render() {
  const nodes = S.nodes.filter(n => S.data[n.label]);
  const names = nodes.map(n => n.label);
  const series = (f, src = "rounds") => joinSeries(nodes.map(n => {
    const rows = S.data[n.label][src];
    return [rows.map(r => r.round), rows.map(f)];
  }));
  plot("chart-reward", names, series(r => r.reward_local_mean), { y: "fraction" });
  plot("chart-eval", names, series(e => e.heldout_accuracy, "evals"), { y: "fraction" });
  plot("chart-round-s", names, series(r => r.round_s));
  plot("chart-rss", names, series(r => r.rss_mb === undefined || r.rss_mb === null ? r.peak_rss_mb : r.rss_mb), { y: "auto" });

  const d = S.data[S.selected] || { rounds: [], evals: [] }, rows = d.rounds, xs = rows.map(r => r.round);
  $("selected-label").textContent = S.selected || "";
  $("selected-peer").textContent = d.status ? d.status.peer_id || "" : "";
  plot("chart-external", ["available", "used"], [xs, rows.map(r => r.external_groups_available), rows.map(r => r.external_groups_used)]);
  const reasons = [...new Set(rows.flatMap(r => Object.keys(r.rejected_new || {})))].sort();
  plot("chart-rejected", reasons.length ? reasons : ["(none)"],
    [xs, ...(reasons.length ? reasons.map(k => rows.map(r => (r.rejected_new || {})[k] || 0)) : [rows.map(() => 0)])]);
  const phases = ["generate_s", "publish_s", "collect_s", "train_s", "merge_s"];
  plot("chart-phases", phases.map(p => p.slice(0, -2)), [xs, ...phases.map(p => rows.map(r => r[p] === undefined ? null : r[p]))]);
  renderSummary(d);
  renderMerges(rows);
  renderPeers(d.peers);
  $("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  $("interval").textContent = String(POLL_MS / 1000);
}

function renderSummary(d) {
  const s = d.status || {}, h = s.health || {}, last = d.rounds[d.rounds.length - 1] || {};
  const ev = d.evals[d.evals.length - 1] || {};
  const cards = [["state", s.state || (d.up ? "?" : "unreachable"), h.ok === false || !d.up ? "bad" : "ok"],
    ["rounds", String(s.round ?? "-"), "", "round-count"], ["model", s.model || "-"],
    ["reward (last round)", fmt(last.reward_local_mean)], ["held-out accuracy", fmt(ev.heldout_accuracy)],
    ["external used / available", last.round ? `${last.external_groups_used} / ${last.external_groups_available}` : "-"],
    ["peers seen", fmt(last.peers_seen, 0)], ["banned peers", fmt(last.banned_peers, 0)],
    ["RSS, MB", fmt(last.rss_mb, 0)], ["since progress, s", fmt(h.seconds_since_progress, 1)]];
  $("summary").replaceChildren(...cards.map(([k, v, cls, id]) => {
    const c = el("div", undefined, "card"), val = el("div", v, "v " + (cls || ""));
    if (id) val.id = id;
    c.append(val, el("div", k, "k"));
    return c;
  }));
  $("health").textContent = s.last_problem ? `last problem: ${s.last_problem}` : "no warnings logged";
}

function renderMerges(rows) {
  const by = {};
  for (const r of rows) if (r.merge_outcome) { by[r.merge_outcome] = by[r.merge_outcome] || [0, 0]; by[r.merge_outcome][0]++; by[r.merge_outcome][1] = r.round; }
  const tb = $("merges-table").tBodies[0], keys = Object.keys(by).sort();
  tb.replaceChildren(...(keys.length ? keys : ["(no merges)"]).map(k => {
    const tr = el("tr");
    tr.append(el("td", k, k === "failed" ? "bad" : ""), el("td", by[k] ? String(by[k][0]) : "-"), el("td", by[k] ? String(by[k][1]) : "-"));
    return tr;
  }));
}

function renderPeers(p) {
  const tb = $("peers-table").tBodies[0];
  if (!p) { tb.replaceChildren(); $("peer-count").textContent = ""; return; }
  $("peer-count").textContent = `(${p.peers.length} shown of ${p.known_peers} known)`;
  tb.replaceChildren(...p.peers.map(r => {
    const tr = el("tr"), rej = Object.entries(r.rejected || {}), nrej = rej.reduce((a, [, v]) => a + v, 0);
    const id = el("td", r.peer_id, "mono peer-id");
    const rc = el("td", String(nrej), nrej ? "bad" : "");
    rc.title = rej.map(([k, v]) => `${k}: ${v}`).join("\n");
    tr.append(id, el("td", r.model || "-"), el("td", fmt(r.last_round, 0)), el("td", fmt(r.age_s, 1)),
      el("td", String(r.accepted_groups)), rc, el("td", r.banned ? "banned" : "no", r.banned ? "bad" : ""));
    return tr;
  }));
}

async function loop() {
  try {
    if (S.tick % SWARM_EVERY === 0 || !S.nodes.length) await refreshSwarm();
    await Promise.all(S.nodes.map(pollNode));
    S.tick++;
    renderNav();
    render();
  } catch (e) {
    $("updated").textContent = `update failed: ${e}`;
  }
  setTimeout(loop, POLL_MS);
}

window.addEventListener("resize", () => {
  for (const [id, c] of Object.entries(S.charts)) c.u.setSize({ width: Math.max(300, $(id).clientWidth - 4), height: 220 });
});
loop();
