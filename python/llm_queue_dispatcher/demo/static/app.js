// llmqd demo page: renders the server's pushed snapshots (server-sent events). Plain JS, no build.
// The server sends counts and the head of each section, never every request, so the DOM stays
// small whatever the queue depth.
"use strict";

const PRIORITY_COLORS = ["#d7263d", "#f49d37", "#3f88c5", "#a3acb9"];
const TENANT_COLORS = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02",
  "#a6761d", "#444444", "#17becf", "#bcbd22", "#8c564b", "#393b79"];
const LANE_COLORS = ["#3f88c5", "#d7263d", "#2e933c", "#8e44ad", "#f49d37", "#17becf"];
const MAX_POINTS = 480;

const state = {
  info: null,           // the hello event: strategies, priorities, tenants, controls
  lanes: [],            // per lane: its DOM nodes and the ids shown last time per section
  chips: new Map(),     // "lane/id" -> chip data of the last snapshot (for pending details)
  points: [],           // chart points, oldest first
  charts: {},
  selected: null,       // {lane, id}
  pending: null,        // the latest snapshot not yet rendered
};

const $ = (id) => document.getElementById(id);
const fmt = (x, digits = 0) => Number(x).toLocaleString("en-US", { maximumFractionDigits: digits, minimumFractionDigits: digits });
const escapeHtml = (text) => String(text).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

// ---- connection -------------------------------------------------------------------------------
function connect() {
  const events = new EventSource("/events");
  events.addEventListener("open", () => setConnection(true));
  events.addEventListener("error", () => setConnection(false));
  events.addEventListener("hello", (event) => onHello(JSON.parse(event.data)));
  events.addEventListener("snapshot", (event) => {
    state.pending = JSON.parse(event.data);
    requestAnimationFrame(renderPending);
  });
}

function setConnection(up) {
  const node = $("connection");
  node.textContent = up ? "live" : "reconnecting…";
  node.className = up ? "up" : "down";
}

// ---- setup on hello ---------------------------------------------------------------------------
function onHello(info) {
  state.info = info;
  $("speed").textContent = `speed ${info.speed}x`;
  fillControls(info.controls);
  buildLanes(info.strategies);
  buildLegend(info);
  const select = $("wait-lane");
  select.innerHTML = info.strategies.map((s, i) => `<option value="${i}">${escapeHtml(s.name)}</option>`).join("");
  state.points = info.history.slice(-MAX_POINTS);
  buildCharts();
}

function fillControls(controls) {
  if (state.info) $("tpm").min = state.info.provider.largest_request;
  $("rpm").value = controls.rpm;
  $("tpm").value = controls.tpm;
  $("arrival_rate").value = controls.arrival_rate;
  controls.priority_mix.forEach((weight, i) => { $(`mix${i}`).value = weight; });
  $("tenants").value = controls.tenants;
  $("failure_rate").value = controls.failure_rate;
}

function buildLanes(strategies) {
  const container = $("lanes");
  container.innerHTML = "";
  state.lanes = strategies.map((strategy) => {
    const lane = document.createElement("article");
    lane.className = "lane";
    lane.dataset.lane = strategy.name;
    lane.innerHTML = `
      <h2>${escapeHtml(strategy.name)}</h2>
      <p class="desc">${escapeHtml(strategy.description)}</p>
      <div class="stats"></div>
      <table class="waits"><thead><tr><th>wait (s)</th><th>p50</th><th>p95</th><th>p99</th></tr></thead><tbody></tbody></table>
      <div class="section pending"><h3>Pending <span class="count"></span></h3><div class="depthbar"></div>
        <div class="mix" title="waiting by priority"></div><div class="chips"></div></div>
      <div class="section processing"><h3>Processing <span class="count"></span></h3><div class="chips"></div></div>
      <div class="section completed"><h3>Completed <span class="count"></span></h3><div class="chips"></div></div>`;
    container.appendChild(lane);
    const section = (name) => ({
      count: lane.querySelector(`.${name} .count`),
      chips: lane.querySelector(`.${name} .chips`),
      items: null,
      frozen: false,
    });
    const built = {
      name: strategy.name,
      stats: lane.querySelector(".stats"),
      waits: lane.querySelector(".waits tbody"),
      depthbar: lane.querySelector(".depthbar"),
      mix: lane.querySelector(".pending .mix"),
      pending: section("pending"),
      processing: section("processing"),
      completed: section("completed"),
    };
    holdWhilePointed(built);
    return built;
  });
}

function buildLegend(info) {
  const swatch = (color, label) => `<span><span class="swatch" style="background:${color}"></span>${escapeHtml(label)}</span>`;
  $("legend").innerHTML = [
    "<span>fill = priority:</span>",
    ...info.priorities.map((name, i) => swatch(PRIORITY_COLORS[i], name)),
    "<span>left edge = tenant:</span>",
    ...info.tenants.slice(0, info.controls.tenants).map((name, i) => swatch(TENANT_COLORS[i], name)),
    `<span>provider: ${info.provider.concurrency} concurrent per column, latency ${info.provider.base_latency} s + ${info.provider.seconds_per_1k_tokens} s per 1k tokens</span>`,
  ].join(" ");
}

// ---- rendering a snapshot ---------------------------------------------------------------------
function renderPending() {
  const snapshot = state.pending;
  if (!snapshot || !state.info) return;
  state.pending = null;
  $("clock").textContent = `t = ${fmt(snapshot.t, 0)} s`;
  $("arrived").textContent = `${fmt(snapshot.arrived)} requests arrived`;
  state.chips.clear();
  snapshot.lanes.forEach((data, i) => renderLane(state.lanes[i], data, snapshot.controls));
  if (snapshot.point) addPoint(snapshot.point);
}

function renderLane(lane, data, controls) {
  if (!lane) return;
  const s = data.stats;
  const tpm = controls.tpm;
  const tpmShare = tpm > 0 ? (100 * s.granted_per_minute) / tpm : 0;
  lane.stats.innerHTML = [
    ["throughput", `${fmt(s.throughput)} / min`],
    ["tokens granted", `${fmt(s.granted_per_minute)} / min (${fmt(tpmShare)} % of TPM)`,
      "tokens the limiter granted over the last minute, actual counts where known"],
    ["actual / estimate", `${fmt(100 * s.actual_to_estimate)} %`,
      "the estimation error: actual tokens of the calls completed in the last minute, against their estimates"],
    ["saved budget", `${fmt(s.rpm_available)} req, ${fmt(s.tpm_available)} tok`,
      "what the buckets hold now: spendable on top of the refill"],
    ["failed attempts", fmt(s.failed_attempts)],
    ["dead-lettered", fmt(s.dead_lettered)],
  ].map(([k, v, title]) => `<span${title ? ` title="${escapeHtml(title)}"` : ""}>${k}</span><span>${v}</span>`).join("");
  lane.waits.innerHTML = state.info.priorities.map((name, i) => {
    const [p50, p95, p99] = s.waits[name];
    return `<tr><td style="color:${PRIORITY_COLORS[i]}">${name}</td><td>${fmt(p50, 1)}</td><td>${fmt(p95, 1)}</td><td>${fmt(p99, 1)}</td></tr>`;
  }).join("");
  const total = data.pending.total;
  lane.depthbar.innerHTML = total === 0 ? "" : data.pending.by_priority.map((n, i) =>
    `<div style="width:${(100 * n) / total}%;background:${PRIORITY_COLORS[i]}" title="${state.info.priorities[i]}: ${n}"></div>`).join("");
  setCount(lane.pending, total, fmt(total));
  lane.mix.innerHTML = data.pending.by_priority.map((n, i) =>
    `<span style="color:${PRIORITY_COLORS[i]}">${state.info.priorities[i][0]}</span> ${fmt(n)}`).join(" · ");
  setCount(lane.processing, data.processing.total, fmt(data.processing.total));
  setCount(lane.completed, data.completed.total, fmt(data.completed.total));
  renderChips(lane, "pending", data.pending.head);
  renderChips(lane, "processing", data.processing.items);
  renderChips(lane, "completed", data.completed.items);
}

function setCount(section, total, text) {
  section.count.textContent = text;
  section.count.dataset.total = total;
}

// Keyed update: a chip still shown keeps its element, so it does not flicker or vanish under
// the pointer; while the pointer is over a section, that section holds still (counts go on).
function renderChips(lane, name, items) {
  const section = lane[name];
  for (const item of items) state.chips.set(`${lane.name}/${item.id}`, { ...item, state: name });
  section.items = items;
  if (section.frozen) return;
  const container = section.chips;
  const existing = new Map();
  for (const node of container.children) existing.set(node.dataset.id, node);
  items.forEach((item, index) => {
    let node = existing.get(item.id);
    if (node) {
      existing.delete(item.id);
      node.classList.remove("new");
      node.classList.toggle("failed", Boolean(item.f));
    } else {
      node = makeChip(lane.name, name, item);
    }
    const current = container.children[index];
    if (current !== node) container.insertBefore(node, current || null);
  });
  for (const node of existing.values()) node.remove();
}

function makeChip(laneName, sectionName, item) {
  const node = document.createElement("button");
  node.type = "button";
  node.className = `chip p${item.p} new`;
  if (item.f) node.classList.add("failed");
  const selected = state.selected;
  if (selected && selected.lane === laneName && selected.id === item.id) node.classList.add("selected");
  node.style.setProperty("--tenant", item.t >= 0 ? TENANT_COLORS[item.t] : "#999");
  node.dataset.lane = laneName;
  node.dataset.id = item.id;
  node.dataset.state = sectionName;
  const tenantName = item.t >= 0 ? state.info.tenants[item.t] : "no tenant";
  node.title = `${item.id} · ${state.info.priorities[item.p]} · ${tenantName} · ${item.k} tokens` +
    (item.s === null || item.s === undefined ? "" : ` · score ${item.s.toFixed(3)}`);
  node.textContent = item.id;
  return node;
}

function holdWhilePointed(lane) {
  for (const name of ["pending", "processing", "completed"]) {
    const section = lane[name];
    section.chips.addEventListener("mouseenter", () => { section.frozen = true; });
    section.chips.addEventListener("mouseleave", () => {
      section.frozen = false;
      if (section.items) renderChips(lane, name, section.items);
    });
  }
}

// ---- request details (one fetch per click) ----------------------------------------------------
async function showDetail(laneName, id, chipState) {
  state.selected = { lane: laneName, id };
  document.querySelectorAll(".chip.selected").forEach((node) => node.classList.remove("selected"));
  document.querySelectorAll(`.chip[data-lane="${CSS.escape(laneName)}"][data-id="${CSS.escape(id)}"]`)
    .forEach((node) => node.classList.add("selected"));
  const panel = $("detail");
  const chip = state.chips.get(`${laneName}/${id}`);
  if (chipState === "pending") {
    renderPendingDetail(panel, laneName, id, chip);
    return;
  }
  try {
    const response = await fetch(`/api/requests/${encodeURIComponent(laneName)}/${encodeURIComponent(id)}`);
    if (response.status === 404) {
      panel.innerHTML = `<h2>${escapeHtml(id)}</h2><p class="hint">No longer in view on the server.</p>`;
      return;
    }
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    renderScoredDetail(panel, await response.json());
  } catch (error) {
    panel.innerHTML = `<h2>${escapeHtml(id)}</h2><p class="hint">Could not load it: ${escapeHtml(error.message)}</p>`;
  }
}

function renderPendingDetail(panel, laneName, id, chip) {
  const rows = chip ? [
    ["strategy", laneName], ["state", "pending"], ["priority", state.info.priorities[chip.p]],
    ["tenant", chip.t >= 0 ? state.info.tenants[chip.t] : "none"], ["estimated tokens", fmt(chip.k)],
  ] : [["strategy", laneName], ["state", "pending"]];
  panel.innerHTML = `<h2>${escapeHtml(id)}</h2><dl>${rows.map(([k, v]) => `<dt>${k}</dt><dd>${escapeHtml(v)}</dd>`).join("")}</dl>
    <p class="hint">Waiting. The dispatcher scores every waiting request at each dequeue and sends the best one the
    limiter admits; its score breakdown shows here once it is dispatched.</p>`;
}

function renderScoredDetail(panel, detail) {
  const rows = [
    ["strategy", detail.lane], ["state", detail.state], ["priority", detail.priority],
    ["tenant", detail.tenant ?? "none"], ["estimated tokens", fmt(detail.estimated_tokens)],
    ["actual tokens", detail.actual_tokens === null ? "–" : fmt(detail.actual_tokens)],
    ["attempt", detail.attempt], ["waited", `${fmt(detail.wait, 2)} s`],
  ];
  const entries = Object.entries(detail.score.breakdown);
  const top = Math.max(1e-9, ...entries.map(([, v]) => v));
  panel.innerHTML = `<h2>${escapeHtml(detail.id)}</h2>
    <dl>${rows.map(([k, v]) => `<dt>${k}</dt><dd>${escapeHtml(v)}</dd>`).join("")}</dl>
    <h3>Score ${detail.score.total.toFixed(3)}</h3>
    <table class="breakdown" aria-label="score breakdown"><tbody>${entries.map(([name, value]) =>
      `<tr><td class="name">${escapeHtml(name)}</td><td><div class="bar" style="width:${(100 * value) / top}%"></div></td>` +
      `<td class="value">${value.toFixed(3)}</td></tr>`).join("")}</tbody></table>
    <p>reason</p><p class="reason">${escapeHtml(detail.reason)}</p>`;
}

// ---- controls ---------------------------------------------------------------------------------
function status(text, ok) {
  const node = $("control-status");
  node.textContent = text;
  node.className = ok ? "ok" : "error";
}

async function post(path, body) {
  const response = await fetch(path, {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
  const reply = await response.json();
  if (!response.ok) throw new Error(reply.error || `HTTP ${response.status}`);
  return reply;
}

async function applyControls(event) {
  event.preventDefault();
  // NaN and empty fields travel as null: the server names the bad field and changes nothing.
  const number = (id) => { const v = $(id).valueAsNumber; return Number.isFinite(v) ? v : null; };
  const body = {
    rpm: number("rpm"), tpm: number("tpm"), arrival_rate: number("arrival_rate"),
    priority_mix: [0, 1, 2, 3].map((i) => number(`mix${i}`)),
    tenants: number("tenants"), failure_rate: number("failure_rate"),
  };
  try {
    const reply = await post("/api/controls", body);
    fillControls(reply.controls);
    state.info.controls = reply.controls;
    buildLegend(state.info);
    status("applied", true);
  } catch (error) {
    status(error.message, false);
  }
}

async function injectBurst(event) {
  event.preventDefault();
  const size = $("burst-size").valueAsNumber;
  const priority = $("burst-priority").value || null;
  try {
    const reply = await post("/api/burst", { size: Number.isFinite(size) ? size : null, priority });
    status(`injected ${fmt(reply.enqueued)} requests in every column`, true);
  } catch (error) {
    status(error.message, false);
  }
}

// ---- charts -----------------------------------------------------------------------------------
function chartOptions(element, series, yLabel) {
  return {
    width: Math.max(300, element.clientWidth),
    height: 190,
    scales: { x: { time: false } },
    legend: { live: false },
    cursor: { drag: { x: false, y: false } },
    series: [{ label: "t (s)" }, ...series],
    axes: [{ label: "simulated seconds", size: 36 }, { label: yLabel, size: 56 }],
  };
}

function laneSeries() {
  return state.info.strategies.map((strategy, i) => ({
    label: strategy.name, stroke: LANE_COLORS[i % LANE_COLORS.length], width: 1.5, points: { show: false },
  }));
}

function buildCharts() {
  for (const chart of Object.values(state.charts)) chart.destroy();
  const make = (id, series, yLabel) => {
    const element = $(id);
    element.innerHTML = "";
    return new uPlot(chartOptions(element, series, yLabel), [[], ...series.map(() => [])], element);
  };
  const limit = { label: "TPM limit (refill / min)", stroke: "#1d2430", dash: [6, 4], width: 1.5, points: { show: false } };
  const ceiling = { label: "capacity + TPM", stroke: "#8a93a3", dash: [2, 3], width: 1.5, points: { show: false } };
  state.charts = {
    throughput: make("chart-throughput", laneSeries(), "req / min"),
    tpm: make("chart-tpm", [...laneSeries(), limit, ceiling], "tokens / min"),
    wait: make("chart-wait", state.info.priorities.map((name, i) => ({
      label: name, stroke: PRIORITY_COLORS[i], width: 1.5, points: { show: false },
    })), "seconds"),
    depth: make("chart-depth", laneSeries(), "requests"),
  };
  redrawCharts();
}

function addPoint(point) {
  state.points.push(point);
  if (state.points.length > MAX_POINTS) state.points.splice(0, state.points.length - MAX_POINTS);
  redrawCharts();
}

function redrawCharts() {
  const points = state.points;
  if (!state.charts.throughput) return;
  const xs = points.map((p) => p.t);
  const lanes = state.info.strategies.map((_, i) => i);
  const per = (key) => lanes.map((i) => points.map((p) => (p.lanes[i] ? p.lanes[i][key] : null)));
  state.charts.throughput.setData([xs, ...per("throughput")]);
  state.charts.tpm.setData([xs, ...per("granted_per_minute"), points.map((p) => p.tpm_limit),
    points.map((p) => p.tpm_ceiling)]);
  state.charts.depth.setData([xs, ...per("depth")]);
  const chosen = Number($("wait-lane").value || 0);
  state.charts.wait.setData([xs, ...state.info.priorities.map((_, q) =>
    points.map((p) => (p.lanes[chosen] ? p.lanes[chosen].wait_p95[q] : null)))]);
}

function resizeCharts() {
  for (const [name, chart] of Object.entries(state.charts)) {
    const element = $(`chart-${name}`);
    chart.setSize({ width: Math.max(300, element.clientWidth), height: 190 });
  }
}

// ---- wiring -----------------------------------------------------------------------------------
$("lanes").addEventListener("click", (event) => {
  const chip = event.target.closest(".chip");
  if (chip) showDetail(chip.dataset.lane, chip.dataset.id, chip.dataset.state);
});
$("limits-form").addEventListener("submit", applyControls);
$("burst-form").addEventListener("submit", injectBurst);
$("wait-lane").addEventListener("change", redrawCharts);
let resizeTimer = 0;
window.addEventListener("resize", () => { clearTimeout(resizeTimer); resizeTimer = setTimeout(resizeCharts, 150); });
connect();
