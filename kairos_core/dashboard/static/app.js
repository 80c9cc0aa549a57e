// The kairos dashboard: reads the node's JSON API and its ledger watch stream.
// Every string from the API (hostnames, keys, values: what peers wrote) goes into the page as a
// text node (textContent / createTextNode), never as HTML: the API escapes nothing.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const POLL_MS = 3000;
const state = {
  status: null,
  peers: [],
  nodes: {},          // the `nodes` bucket: peer id -> advertised entry (neighbours, hostname)
  vpn: {},            // the `vpn` bucket: "<peer>" -> address claim, "<peer>/links" -> paths
  buckets: [],
  bucket: null,       // the bucket the ledger page shows
  entries: new Map(), // its entries by key
  leases: {},         // the `leader` bucket: "<network>:<epoch>:<peer>" -> lease
  changes: 0,
};

// --- DOM helpers: text only -------------------------------------------------------------------
function h(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, value);
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
  if (text !== undefined) node.textContent = String(text);
  return node;
}

function fill(tbody, rows) {
  tbody.replaceChildren(...rows.map((cells) => h("tr", {}, ...cells.map((cell) => h("td", {}, cell)))));
}

function short(peerId) {
  return typeof peerId === "string" && peerId.length > 14 ? peerId.slice(0, 6) + "…" + peerId.slice(-6) : String(peerId);
}

function hostOf(peerId) {
  const entry = state.nodes[peerId];
  if (entry && typeof entry.hostname === "string") return entry.hostname;
  if (state.status && state.status.peer_id === peerId) return state.status.hostname;
  return short(peerId);
}

function json(value) {
  const text = JSON.stringify(value);
  return text === undefined ? "" : text.length > 300 ? text.slice(0, 300) + "…" : text;
}

function showError(message) {
  const box = document.getElementById("error");
  box.hidden = !message;
  box.textContent = message || "";
}

async function api(path, options) {
  const response = await fetch(path, { credentials: "same-origin", ...options });
  const body = (response.headers.get("content-type") || "").startsWith("application/json") ? await response.json() : null;
  if (!response.ok) throw new Error((body && body.error) || `HTTP ${response.status}`);
  return body;
}

// --- pages ------------------------------------------------------------------------------------
function renderSummary() {
  const s = state.status;
  if (!s) return;
  document.getElementById("title-host").textContent = s.hostname;
  const reach = s.reachability || {};
  const leader = s.leader ? `${hostOf(s.leader.peer_id)} (${short(s.leader.peer_id)})` : "none yet";
  const facts = [
    ["hostname", s.hostname, "hostname"],
    ["peer id", s.peer_id, "peer-id"],
    ["network", s.network_id, "network"],
    ["token fingerprint", s.token_fingerprint, "fingerprint"],
    ["leader", leader + (s.is_leader ? " — this node" : ""), "leader"],
    ["epoch", s.leader ? s.leader.epoch : "–", "epoch"],
    ["members", s.members + 1, "members"],  // the status counts the alive peers, not this node
    ["alive peers", s.members, "alive-peers"],
    ["admitted connections", s.admitted, "admitted"],
    ["reachability", [reach.reachability || "unknown", ...(reach.observed || []).map((a) => `observed as ${a}`),
                      ...(reach.relays || []).map((r) => `relay ${short(r)}`)].join(", "), "reachability"],
    ["ledger entries", s.ledger_entries, "ledger-entries"],
    ["addresses", (s.addresses || []).join("  "), "addresses"],
    ["version", s.version, "version"],
    ["up", `${Math.round(s.uptime_s)} s`, "uptime"],
  ];
  document.getElementById("summary").replaceChildren(
    ...facts.flatMap(([label, value, id]) => [h("dt", {}, label), h("dd", { id: `summary-${id}` }, value)]));
  fill(document.querySelector("#leader-history tbody"), epochs(s.network_id).map((lease) => [
    lease.epoch, `${hostOf(lease.peer)} (${short(lease.peer)})`, new Date(lease.claimed[0]).toLocaleString(),
    lease.state === "held" ? "held" : "claimed"]));
}

// Each epoch's leader from the leases in the ledger (election.py: the earliest claim of the
// highest epoch wins; a held lease is the one its winner renewed), newest epoch first.
function compare(a, b) {
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return a[i] < b[i] ? -1 : 1;
  return 0;
}

function epochs(networkId) {
  const best = new Map();
  for (const [key, lease] of Object.entries(state.leases)) {
    if (!key.startsWith(`${networkId}:`) || !lease || typeof lease !== "object") continue;
    if (!Number.isInteger(lease.epoch) || !Array.isArray(lease.claimed) || typeof lease.peer !== "string") continue;
    const rank = (l) => [l.state === "held" ? 0 : 1, l.claimed[0], l.claimed[1]];
    const known = best.get(lease.epoch);
    if (!known || compare(rank(lease), rank(known)) < 0) best.set(lease.epoch, lease);
  }
  return [...best.values()].sort((a, b) => b.epoch - a.epoch).slice(0, 20);
}

function formatRtt(ms) {
  // published values are whole milliseconds; this node's own are finer
  return Number.isInteger(ms) || ms >= 10 ? `${Math.round(ms)} ms` : `${ms.toFixed(1)} ms`;
}

function links() {
  // One undirected link per pair that either side vouches for. Its transport (direct TCP or a
  // relayed circuit) and RTT: this node's own links from /api/peers (measured now), the others'
  // from each end's `nodes` entry (`relayed`, and `rtt_ms` lined up with `neighbours`: refreshed
  // at most once a minute); the VPN's path from its link table.
  const found = new Map();
  const pair = (x, y) => {
    const [a, b] = [x, y].sort();
    const key = a + " " + b;
    if (!found.has(key)) found.set(key, { a, b, paths: new Set(), transport: null, rtt: null, live: false });
    return found.get(key);
  };
  const measured = (link, transport, rtt) => {
    // the most telling kind wins: relayed, then punched (a direct one through NATs), then direct
    const rank = { relayed: 3, punched: 2, direct: 1 };
    if ((rank[transport] || 0) > (rank[link.transport] || 0)) link.transport = transport;
    if (typeof rtt === "number" && rtt > 0 && !link.live && (link.rtt === null || rtt < link.rtt)) link.rtt = rtt;
  };
  for (const [peer, entry] of Object.entries(state.nodes)) {
    if (peer.includes("/")) continue;  // "<peer>/epochs" and the like: not a member's entry
    const neighbours = entry && Array.isArray(entry.neighbours) ? entry.neighbours : [];
    const rtts = entry && Array.isArray(entry.rtt_ms) && entry.rtt_ms.length === neighbours.length ? entry.rtt_ms : [];
    const relayed = entry && Array.isArray(entry.relayed) ? entry.relayed : [];
    neighbours.forEach((other, i) => {
      if (typeof other !== "string" || other === peer) return;
      measured(pair(peer, other), relayed.includes(other) ? "relayed" : "direct", rtts[i]);
    });
  }
  const self = state.status && state.status.peer_id;
  for (const p of state.peers) {
    if (!self || !p.connected || typeof p.peer_id !== "string") continue;
    const link = pair(self, p.peer_id);
    if (typeof p.transport === "string") link.transport = p.transport;
    if (typeof p.rtt_ms === "number") { link.rtt = p.rtt_ms; link.live = true; }
  }
  for (const [key, value] of Object.entries(state.vpn)) {
    if (!key.endsWith("/links") || !value || typeof value !== "object") continue;
    const from = key.slice(0, -"/links".length);
    for (const [to, link] of Object.entries(value)) {
      const known = found.get([from, to].sort().join(" "));
      if (known && link && typeof link.path === "string") known.paths.add(link.path);
    }
  }
  return [...found.values()];
}

function linkLabel(link) {
  // "direct · 0.4 ms", "relayed · 41 ms · vpn stream": the connection's kind, its RTT, the VPN's path
  const parts = [link.transport || "link"];
  if (link.rtt !== null) parts.push(formatRtt(link.rtt));
  // tunvpn names a relayed path "relay via <peer id>": the relay's hostname reads better
  const named = (path) => (path.startsWith("relay via ") ? "relay via " + hostOf(path.slice("relay via ".length)) : path);
  const vpn = [...link.paths].map(named).sort().join("/");
  if (vpn) parts.push(`vpn ${vpn}`);
  return parts.join(" · ");
}

function renderGraph() {
  const graph = document.getElementById("graph");
  const ids = new Set(state.peers.map((p) => p.peer_id));  // every known peer, alive or not
  if (state.status) ids.add(state.status.peer_id);
  const members = [...ids].sort();
  const alive = new Map(state.peers.map((p) => [p.peer_id, p.alive]));
  const cx = 320, cy = 210, r = members.length > 1 ? 150 : 0;
  const at = new Map(members.map((id, i) => {
    const angle = (2 * Math.PI * i) / members.length - Math.PI / 2;
    return [id, [cx + r * Math.cos(angle), cy + r * Math.sin(angle)]];
  }));
  const shapes = [];
  for (const link of links()) {
    if (!at.has(link.a) || !at.has(link.b)) continue;
    const [x1, y1] = at.get(link.a), [x2, y2] = at.get(link.b);
    const path = [...link.paths].sort().join("/");
    shapes.push(svg("line", { class: "link" + (path ? " path-" + path.split(/[/ ]/)[0] : "") + (link.transport === "relayed" ? " relayed" : ""),
                              x1, y1, x2, y2, "data-a": link.a, "data-b": link.b }));
    shapes.push(svg("text", { class: "link-label", x: (x1 + x2) / 2, y: (y1 + y2) / 2 - 4,
                              "data-a": link.a, "data-b": link.b, "data-rtt-ms": link.rtt === null ? "" : link.rtt }, linkLabel(link)));
  }
  for (const id of members) {
    const [x, y] = at.get(id);
    const self = state.status && id === state.status.peer_id;
    const up = self || alive.get(id);
    const group = svg("g", { class: "member" + (up ? " alive" : " dead") + (self ? " self" : ""), "data-peer": id });
    group.append(svg("circle", { cx: x, cy: y, r: 18 }));
    group.append(svg("text", { class: "member-label", x, y: y + 34 }, hostOf(id)));
    group.append(svg("title", {}, id));
    shapes.push(group);
  }
  graph.replaceChildren(...shapes);
}

function renderPeers() {
  fill(document.querySelector("#peers tbody"), state.peers.map((p) => [
    state.nodes[p.peer_id] || !p.hostname ? hostOf(p.peer_id) : p.hostname,
    short(p.peer_id), p.alive ? "yes" : "no", p.connected ? "yes" : "no",
    (typeof p.rtt_ms === "number" ? formatRtt(p.rtt_ms) : "–") + (p.transport === "relayed" ? " (relayed)" : ""),
    p.last_seen_s === null ? "–" : `${p.last_seen_s} s ago`,
    (state.nodes[p.peer_id] || {}).reachability || "unknown", (state.nodes[p.peer_id] || {}).role || "auto",
    p.version || "", (p.addresses || []).join("  "),
  ]));
  renderGraph();
}

function renderBuckets() {
  const list = document.getElementById("buckets");
  list.replaceChildren(...state.buckets.map((name) => {
    const link = h("a", { href: "#ledger", "data-bucket": name, class: name === state.bucket ? "current" : "" }, name);
    link.addEventListener("click", (event) => { event.preventDefault(); openBucket(name); });
    return h("li", {}, link);
  }));
}

function renderEntries() {
  document.getElementById("bucket-title").textContent = state.bucket ? `bucket ${state.bucket}` : "choose a bucket";
  const rows = [...state.entries.values()].sort((a, b) => (a.key < b.key ? -1 : a.key > b.key ? 1 : 0));
  const tbody = document.querySelector("#entries tbody");
  tbody.replaceChildren(...rows.map((e) => {
    const [wall, counter] = e.version || [0, 0];
    const row = h("tr", { "data-key": e.key },
      h("td", { class: "key" }, e.key), h("td", {}, hostOf(e.owner)),
      h("td", { title: `${wall} ms, counter ${counter}` }, `${new Date(wall).toLocaleTimeString()} #${counter}`),
      h("td", { class: "value" }, json(e.value)));
    return row;
  }));
}

function renderVPN() {
  const claims = Object.entries(state.vpn).filter(([key, v]) => !key.includes("/") && v && typeof v === "object");
  fill(document.querySelector("#vips tbody"), claims.map(([peer, claim]) =>
    [hostOf(peer), short(peer), claim.vip || "", claim.udp_port ?? "", claim.static ? "yes" : "no"]));
  const rows = [];
  for (const [key, value] of Object.entries(state.vpn)) {
    if (!key.endsWith("/links") || !value || typeof value !== "object") continue;
    const from = key.slice(0, -"/links".length);
    for (const [to, link] of Object.entries(value)) {
      if (!link || typeof link !== "object") continue;
      rows.push([hostOf(from), hostOf(to), link.path || "", link.vip || "", link.endpoint || "–"]);
    }
  }
  fill(document.querySelector("#vpn-links tbody"), rows);
  const counters = Object.entries((state.status || {}).counters || {}).filter(([name]) => name.startsWith("vpn_"));
  fill(document.querySelector("#vpn-counters tbody"), counters);
}

function renderPlugins() {
  const s = state.status || {};
  fill(document.querySelector("#states tbody"), Object.entries(s.states || {}));
  fill(document.querySelector("#counters tbody"), Object.entries(s.counters || {}));
}

function renderAll() {
  renderSummary();
  renderPeers();
  renderBuckets();
  renderEntries();
  renderVPN();
  renderPlugins();
}

// --- data -------------------------------------------------------------------------------------
async function refresh() {
  try {
    const [status, peers, buckets, nodes, vpn, leases] = await Promise.all([
      api("/api/status"), api("/api/peers"), api("/api/ledger"), api("/api/ledger/nodes"), api("/api/ledger/vpn"),
      api("/api/ledger/leader"),
    ]);
    Object.assign(state, { status, peers, buckets, nodes, vpn, leases });
    if (state.bucket === null && buckets.length) await openBucket(buckets[0], false);
    showError(null);
    renderAll();
  } catch (error) {
    showError(`cannot read the node's API: ${error.message}`);
  }
}

async function openBucket(name, render = true) {
  state.bucket = name;
  const entries = await api(`/api/entries/${encodeURIComponent(name)}`);
  if (state.bucket !== name) return;
  state.entries = new Map(entries.map((e) => [e.key, e]));
  if (render) { renderBuckets(); renderEntries(); }
}

function applyUpdate(update) {
  if (typeof update.bucket !== "string" || typeof update.key !== "string") return;
  if (update.bucket === "nodes") { if (update.deleted) delete state.nodes[update.key]; else state.nodes[update.key] = update.value; }
  if (update.bucket === "vpn") { if (update.deleted) delete state.vpn[update.key]; else state.vpn[update.key] = update.value; }
  if (!update.deleted && !state.buckets.includes(update.bucket)) { state.buckets.push(update.bucket); state.buckets.sort(); renderBuckets(); }
  if (update.bucket === state.bucket) {
    if (update.deleted) state.entries.delete(update.key);
    else state.entries.set(update.key, { key: update.key, owner: update.owner, version: update.version, value: update.value });
    renderEntries();
  }
  if (update.bucket !== "nodes") {  // heartbeats would flood the list
    const list = document.getElementById("changes");
    list.prepend(h("li", {}, `${new Date().toLocaleTimeString()} ${update.deleted ? "deleted" : "set"} ${update.bucket}/${update.key} by ${hostOf(update.owner)}`));
    while (list.children.length > 100) list.lastChild.remove();
  }
  if (update.bucket === "nodes" || update.bucket === "vpn") scheduleRender();
}

let renderPending = false;
function scheduleRender() {
  if (renderPending) return;
  renderPending = true;
  setTimeout(() => { renderPending = false; renderPeers(); renderVPN(); }, 250);
}

function setLive(on) {
  const badge = document.getElementById("live");
  badge.className = on ? "live on" : "live off";
  badge.textContent = on ? "live" : "offline";
}

// The watch stream is newline-delimited JSON over one long response; read it as it comes.
async function watch() {
  for (;;) {
    try {
      const response = await fetch("/api/watch", { credentials: "same-origin" });
      if (!response.ok || !response.body) throw new Error(`HTTP ${response.status}`);
      setLive(true);
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let pending = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        pending += decoder.decode(value, { stream: true });
        let newline;
        while ((newline = pending.indexOf("\n")) >= 0) {
          const line = pending.slice(0, newline).trim();
          pending = pending.slice(newline + 1);
          if (!line) continue;
          let update;
          try { update = JSON.parse(line); } catch { continue; }
          if (update && typeof update === "object" && !update.error) applyUpdate(update);
        }
      }
    } catch (error) {
      // the node restarted or the network dropped: try again shortly
    }
    setLive(false);
    await new Promise((resolve) => setTimeout(resolve, 2000));
  }
}

function showPage() {
  const page = (location.hash || "#summary").slice(1);
  for (const section of document.querySelectorAll(".page")) section.hidden = section.id !== `page-${page}`;
  for (const link of document.querySelectorAll("nav a")) link.classList.toggle("current", link.dataset.page === page);
}

function setUp() {
  window.addEventListener("hashchange", showPage);
  showPage();
  document.getElementById("set-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const form = event.target, result = document.getElementById("set-result");
    let value;
    try { value = JSON.parse(form.value.value); } catch { result.textContent = "the value is not JSON"; return; }
    try {
      await api(`/api/ledger/${encodeURIComponent(form.bucket.value)}/${encodeURIComponent(form.key.value)}`, {
        method: "PUT", body: JSON.stringify(value),
        headers: { "content-type": "application/json", "x-kairos-dashboard": "1" },
      });
      result.textContent = "written";
    } catch (error) {
      result.textContent = error.message;
    }
  });
  // first paint, then mark the page loaded (the browser test measures up to this mark)
  refresh().then(() => { document.body.dataset.loaded = String(performance.now()); });
  setInterval(refresh, POLL_MS);
  watch();
}

setUp();
