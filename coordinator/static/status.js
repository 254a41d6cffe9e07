// Polls /api/status every second and renders every section (shapes: coordinator/status.py).
// No dependencies, no CDN. Peer-reported strings are inserted as text nodes only, never as HTML.
// Both views render: the public one (no addresses, hashes or run configs: shown as "hidden")
// and the operator one. The peer table is paged (prev/next); the page's own query string
// (e.g. ?peers_offset=200) is passed on to /api/status.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const LIVE_STATES = ["joining", "active", "suspect"];
const MAX_MATRIX_PEERS = 16;  // the link matrix stays readable; the JSON has every row

function text(value) {
  return value === null || value === undefined || value === "" ? "-" : String(value);
}

function bytes(n) {
  if (typeof n !== "number") return "-";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i === 0 ? n.toFixed(0) : n.toFixed(1)) + " " + units[i];
}

function count(n) {
  if (typeof n !== "number") return "-";
  if (n >= 1e9) return (n / 1e9).toFixed(2) + " G";
  if (n >= 1e6) return (n / 1e6).toFixed(2) + " M";
  if (n >= 1e3) return (n / 1e3).toFixed(1) + " k";
  return String(Math.round(n));
}

function shortId(id) {
  return typeof id === "string" ? id.slice(0, 12) : "-";
}

function el(tag, props, children) {
  const node = document.createElement(tag);
  Object.assign(node, props || {});
  for (const c of children || []) node.append(c);
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  return node;
}

function cell(row, value, className) {
  row.appendChild(el("td", { textContent: value, className: className || "" }));
}

const pageQuery = new URLSearchParams(window.location.search);

function reachability(p) {
  if (p.reachable === true) {
    return typeof p.probe_rtt_s === "number" ? "yes, " + (p.probe_rtt_s * 1000).toFixed(1) + " ms" : "yes";
  }
  if (p.reachable === false) return p.probe_error ? "no: " + p.probe_error : "no";
  return p.reachable === null ? "probing" : "-";
}

function medianPingMs(stats) {
  const links = (stats && stats.links) || {};
  const rtts = Object.values(links)
    .map((row) => row && row.ping_rtt_s)
    .filter((v) => typeof v === "number")
    .sort((a, b) => a - b);
  return rtts.length ? (rtts[Math.floor(rtts.length / 2)] * 1000).toFixed(2) + " ms" : "-";
}

// -- header ---------------------------------------------------------------------------------
function renderSummary(status) {
  const counts = status.counts || {};
  const live = LIVE_STATES.reduce((sum, s) => sum + (counts[s] || 0), 0);
  document.getElementById("peer-count").textContent = String(live);
  for (const s of ["active", "joining", "suspect", "dead"]) {
    document.getElementById("count-" + s).textContent = String(counts[s] || 0);
  }
  const reach = status.reachability || {};
  document.getElementById("count-unreachable").textContent =
    typeof reach.unreachable === "number" ? String(reach.unreachable) : "-";
  document.getElementById("run-count").textContent = String((status.runs || []).length);
  document.getElementById("model-count").textContent = String((status.inference || []).length);
  const c = status.coordinator || {};
  const summary = document.getElementById("summary");
  const broken = Object.keys(status.section_errors || {});
  summary.className = broken.length ? "warn" : "";
  summary.textContent = "heartbeat every " + c.heartbeat_interval + " s, timeout " +
    c.peer_timeout + " s, coordinator v" + c.version + " up " + Math.round(c.uptime_s || 0) +
    " s, updated " + new Date((c.time || 0) * 1000).toLocaleTimeString() +
    (broken.length ? " \u2014 unavailable: " + broken.join(", ") : "");
}

// -- peers ----------------------------------------------------------------------------------
function renderPeers(peers, operator) {
  const body = document.querySelector("#peers tbody");
  body.replaceChildren();
  for (const p of peers) {
    const tr = el("tr");
    tr.dataset.peerId = p.peer_id;
    tr.dataset.state = p.state;
    tr.dataset.reachable = String(p.reachable);
    cell(tr, shortId(p.peer_id), "mono");
    cell(tr, operator ? text(p.address) : "hidden", "mono address");
    cell(tr, operator ? text(p.observed) : "hidden", "mono observed");
    cell(tr, reachability(p), "reach " + (p.reachable === true ? "ok" : p.reachable === false ? "bad" : ""));
    cell(tr, text(p.state), "state state-" + p.state);
    cell(tr, (p.roles || []).length ? p.roles.join(", ") : "-");
    cell(tr, text(p.device));
    cell(tr, bytes(p.memory));
    cell(tr, typeof p.heartbeat_age_s === "number" ? p.heartbeat_age_s.toFixed(1) + " s ago" : "-");
    cell(tr, typeof p.throughput === "number" ? (p.throughput / 1e9).toFixed(1) + " GFLOP/s" : "-");
    cell(tr, String(Object.keys((p.stats && p.stats.links) || {}).length));
    cell(tr, medianPingMs(p.stats));
    body.appendChild(tr);
  }
}

function renderPager(page) {
  const box = document.getElementById("peer-pager");
  box.replaceChildren();
  if (!page || typeof page.total !== "number") return;
  const first = page.total ? page.offset + 1 : 0, last = Math.min(page.offset + page.limit, page.total);
  box.append(el("span", { id: "peer-range", textContent: "peers " + first + "\u2013" + last + " of " + page.total }));
  const go = (offset) => { pageQuery.set("peers_offset", String(Math.max(0, offset)));
                           history.replaceState(null, "", "?" + pageQuery.toString()); poll(false); };
  const prev = el("button", { id: "peer-prev", textContent: "\u2190 prev", disabled: page.offset <= 0 });
  prev.onclick = () => go(page.offset - page.limit);
  const next = el("button", { id: "peer-next", textContent: "next \u2192", disabled: last >= page.total });
  next.onclick = () => go(page.offset + page.limit);
  box.append(prev, next);
}

// -- training runs --------------------------------------------------------------------------
function lossPlot(history) {
  const points = (history || []).filter((h) => typeof h.loss === "number" && typeof h.step === "number");
  const W = 520, H = 180, L = 48, R = 12, T = 12, B = 28;
  const plot = svg("svg", { class: "loss-plot", viewBox: `0 0 ${W} ${H}`, width: W, height: H,
                            role: "img", "aria-label": "loss over outer steps" });
  plot.appendChild(svg("rect", { x: L, y: T, width: W - L - R, height: H - T - B, class: "frame" }));
  if (!points.length) {
    const t = svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "axis" });
    t.textContent = "no loss reported yet";
    plot.appendChild(t);
    return plot;
  }
  const steps = points.map((p) => p.step), losses = points.map((p) => p.loss);
  const x0 = Math.min(...steps), x1 = Math.max(...steps);
  let y0 = Math.min(...losses), y1 = Math.max(...losses);
  if (y1 - y0 < 1e-9) { y0 -= 0.5; y1 += 0.5; }
  const sx = (s) => L + (x1 === x0 ? 0.5 : (s - x0) / (x1 - x0)) * (W - L - R);
  const sy = (v) => T + (1 - (v - y0) / (y1 - y0)) * (H - T - B);
  for (const frac of [0, 0.5, 1]) {
    const v = y0 + frac * (y1 - y0);
    plot.appendChild(svg("line", { x1: L, x2: W - R, y1: sy(v), y2: sy(v), class: "grid" }));
    const label = svg("text", { x: L - 6, y: sy(v) + 4, "text-anchor": "end", class: "axis" });
    label.textContent = v.toFixed(2);
    plot.appendChild(label);
  }
  for (const [s, anchor] of [[x0, "start"], [x1, "end"]]) {
    const label = svg("text", { x: sx(s), y: H - 8, "text-anchor": anchor, class: "axis" });
    label.textContent = "step " + s;
    plot.appendChild(label);
  }
  const d = points.map((p, i) => (i ? "L" : "M") + sx(p.step).toFixed(1) + " " + sy(p.loss).toFixed(1)).join(" ");
  plot.appendChild(svg("path", { d, class: "loss-line", "data-points": points.length,
                                 "data-last-loss": points[points.length - 1].loss }));
  const last = points[points.length - 1];
  plot.appendChild(svg("circle", { cx: sx(last.step), cy: sy(last.loss), r: 3, class: "loss-dot" }));
  return plot;
}

function hashAgreement(agreement) {
  if (!agreement || typeof agreement.agreed !== "boolean") return el("span", { textContent: "-" });
  // operator view: {hash: [peer ids]}; public view: groups = [peers per distinct hash]
  const groups = agreement.hashes
    ? Object.entries(agreement.hashes).map(([h, peers]) => [h.slice(0, 8), peers.length])
    : (agreement.groups || []).map((n, i) => ["hash " + (i + 1), n]);
  if (agreement.agreed) {
    const h = agreement.hashes && groups.length ? groups[0][0] + "\u2026 " : "";
    return el("span", { className: "ok", textContent: "\u2713 agreed " + h + "(step " + agreement.step + ")" });
  }
  return el("span", { className: "bad", textContent: "\u2717 split at step " + agreement.step + ": " +
    groups.map(([h, n]) => h + "\u00d7" + n).join(", ") });
}

function stat(label, value) {
  const node = el("div", { className: "stat" }, [el("span", { className: "label", textContent: label })]);
  node.append(typeof value === "string" ? el("span", { className: "value", textContent: value }) : value);
  return node;
}

function renderRuns(runs) {
  const box = document.getElementById("runs");
  box.replaceChildren();
  if (!runs.length) { box.append(el("p", { className: "empty", textContent: "no training runs" })); return; }
  for (const r of runs) {
    const participants = Array.isArray(r.participants) ? r.participants.length : r.participants;
    const card = el("div", { className: "card run" }, [
      el("h3", { textContent: text(r.run_id) + (r.state ? " \u2014 " + r.state : "") }),
    ]);
    card.dataset.runId = r.run_id;
    const stats = el("div", { className: "stats" }, [
      stat("outer step", text(r.outer_step)),
      stat("tokens", count(r.tokens)),
      stat("participants", text(participants)),
      stat("bytes on the wire", bytes(r.bytes_on_wire)),
      stat("compute utilization", typeof r.utilization === "number" ? (r.utilization * 100).toFixed(1) + " %" : "-"),
      stat("global-state hash", hashAgreement(r.hash_agreement)),
    ]);
    card.append(el("div", { className: "run-body" }, [stats, lossPlot(r.history)]));
    box.append(card);
  }
}

// -- inference ------------------------------------------------------------------------------
function renderInference(models) {
  const box = document.getElementById("inference");
  box.replaceChildren();
  if (!models.length) { box.append(el("p", { className: "empty", textContent: "no peer is serving a model" })); return; }
  for (const m of models) {
    const card = el("div", { className: "card model" }, [el("h3", { textContent: m.model })]);
    card.dataset.model = m.model;
    const gaps = m.gaps.map(([a, b]) => (b - a === 1 ? String(a) : a + "\u2013" + (b - 1))).join(", ");
    card.append(el("div", { className: "stats" }, [
      stat("blocks", String(m.n_blocks)),
      stat("servers", String(m.servers.length)),
      stat("sessions", String(m.sessions)),
      stat("tokens/s", m.tokens_per_s.toFixed(1)),
      stat("coverage", el("span", { className: m.complete ? "ok" : "bad",
                                     textContent: m.complete ? "\u2713 complete" : "gaps: blocks " + gaps })),
    ]));
    // One strip per server plus a total row; block i is column i.
    const grid = el("div", { className: "coverage" });
    grid.style.gridTemplateColumns = `10rem repeat(${m.n_blocks}, minmax(4px, 1fr))`;
    const total = el("div", { className: "row-label", textContent: "servers per block" });
    grid.append(total);
    m.coverage.forEach((n, i) => {
      const b = el("div", { className: "block " + (n === 0 ? "gap" : "covered"), title: "block " + i + ": " + n + " server(s)" });
      b.textContent = String(n);
      grid.append(b);
    });
    for (const s of m.servers) {
      grid.append(el("div", { className: "row-label mono", textContent: shortId(s.peer_id) + " " +
        s.blocks[0] + "\u2013" + (s.blocks[1] - 1) + (s.state === "active" ? "" : " (" + s.state + ")") }));
      for (let i = 0; i < m.n_blocks; i++) {
        const held = i >= s.blocks[0] && i < s.blocks[1];
        grid.append(el("div", { className: "block " + (held ? "held state-bg-" + s.state : "none") }));
      }
    }
    card.append(grid);
    box.append(card);
  }
}

// -- link matrix ----------------------------------------------------------------------------
function renderLinks(links) {
  const box = document.getElementById("links");
  box.replaceChildren();
  const reporting = (links.peers || []).filter((id) => links.rows && links.rows[id]);
  const ids = reporting.slice(0, MAX_MATRIX_PEERS);
  if (!ids.length) { box.append(el("p", { className: "empty", textContent: "no link measurements yet" })); return; }
  const head = el("tr", {}, [el("th", { textContent: "from \\ to" })]);
  for (const id of ids) head.append(el("th", { className: "mono", textContent: id.slice(0, 6) }));
  const table = el("table", { id: "link-matrix" }, [el("thead", {}, [head])]);
  const body = el("tbody");
  for (const src of ids) {
    const tr = el("tr", {}, [el("th", { className: "mono", textContent: src.slice(0, 6) })]);
    for (const dst of ids) {
      const link = links.rows[src][dst];
      if (src === dst || !link) { tr.append(el("td", { className: "na", textContent: src === dst ? "" : "-" })); continue; }
      const rtt = link.ping_rtt_s !== null ? link.ping_rtt_s : link.rtt_s;
      const parts = [typeof rtt === "number" ? (rtt * 1000).toFixed(1) : "-",
                     typeof link.bandwidth_Bps === "number" ? (link.bandwidth_Bps / 1e6).toFixed(1) : "-"];
      // how the link is connected, when the peer says (direct, reversed, punched, relayed)
      if (link.path && link.path !== "direct") parts.push(link.path);
      tr.append(el("td", { className: "mono link-" + (link.path || "unknown"), textContent: parts.join(" / ") }));
    }
    body.append(tr);
  }
  table.append(body);
  box.append(table);
  if (reporting.length > ids.length) {
    box.append(el("p", { className: "empty", textContent: "first " + ids.length + " of " + reporting.length + " measuring peers" }));
  }
}

// -- checkpoints and events -----------------------------------------------------------------
function renderCheckpoints(checkpoints) {
  const body = document.querySelector("#checkpoints tbody");
  body.replaceChildren();
  for (const c of checkpoints) {
    const tr = el("tr");
    cell(tr, text(c.run));
    cell(tr, text(c.step));
    cell(tr, bytes(c.size_bytes));
    cell(tr, typeof c.state_hash === "string" ? c.state_hash.slice(0, 16) : "hidden", "mono");
    cell(tr, typeof c.created === "number" ? new Date(c.created * 1000).toLocaleString() : "-");
    body.appendChild(tr);
  }
  if (!checkpoints.length) {
    body.append(el("tr", {}, [el("td", { colSpan: 5, className: "empty", textContent: "no checkpoints" })]));
  }
}

function renderOffenses(offenses) {
  const body = document.querySelector("#offenses tbody");
  body.replaceChildren();
  const peers = offenses.peers || [];
  const banned = new Set((offenses.bans || []).map((b) => b.peer_id));
  for (const p of peers) {
    const tr = el("tr");
    const last = p.last || {};
    cell(tr, shortId(p.peer_id), "mono");
    cell(tr, text(p.reports));
    cell(tr, text(p.reporters));
    cell(tr, (p.codes || []).join(", "));
    cell(tr, text(last.run) + " step " + text(last.step) + ": " + text(last.code) + " " + text(last.detail));
    cell(tr, banned.has(p.peer_id) ? "banned" : "reported");
    body.appendChild(tr);
  }
  for (const b of offenses.bans || []) {
    if (peers.some((p) => p.peer_id === b.peer_id)) continue;
    const tr = el("tr");
    cell(tr, shortId(b.peer_id), "mono");
    for (const value of ["-", "-", text(b.reason), "-", "banned (" + text(b.source) + ")"]) cell(tr, value);
    body.appendChild(tr);
  }
  if (!body.children.length) {
    body.append(el("tr", {}, [el("td", { colSpan: 6, className: "empty", textContent: "no poisoned updates reported" })]));
  }
}

function renderEvents(events) {
  const list = document.getElementById("events");
  list.replaceChildren();
  for (const e of events) {
    list.append(el("li", { textContent: new Date(e.ts * 1000).toLocaleTimeString() + "  " + e.kind +
      "  " + (e.peer_id ? shortId(e.peer_id) : "") }));
  }
}

function render(status) {
  renderSummary(status);
  const operator = status.view === "operator";
  document.body.dataset.view = operator ? "operator" : "public";
  renderPeers(status.peers || [], operator);
  renderPager((status.pages || {}).peers);
  renderRuns(status.runs || []);
  renderInference(status.inference || []);
  renderLinks(status.links || {});
  renderCheckpoints(status.checkpoints || []);
  renderOffenses(status.offenses || {});
  renderEvents(status.events || []);
  document.body.dataset.updated = String((status.coordinator || {}).time || "");
}

async function poll(schedule = true) {
  try {
    const query = pageQuery.toString();
    const resp = await fetch("/api/status" + (query ? "?" + query : ""), { cache: "no-store" });
    if (!resp.ok) throw new Error("HTTP " + resp.status);
    render(await resp.json());
  } catch (err) {
    const summary = document.getElementById("summary");
    summary.className = "error";
    summary.textContent = "coordinator unreachable (" + err.message + "), retrying\u2026";
  }
  if (schedule) setTimeout(poll, 1000);
}

poll();
