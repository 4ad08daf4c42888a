// The poolfleet dashboard: one page, three views (overview, task list, task), drawn from the
// JSON endpoints under /api. No build step: plain browser JavaScript, uPlot for the charts.
"use strict";

const STATES = ["PENDING", "DISPATCHED", "RUNNING", "SUCCEEDED", "FAILED", "TIMED_OUT", "CANCELLED"];
const FINAL = new Set(["SUCCEEDED", "FAILED", "TIMED_OUT", "CANCELLED"]);
const main = document.getElementById("main");
let timer = null;     // the current view's refresh
let charts = [];      // uPlot instances of the overview
let view = 0;         // bumped on every route change: late answers of an old view are dropped
let can = {};         // what this master offers beyond the base requests (GET /api/info)

// -- building blocks ---------------------------------------------------------------------
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function when(t) {
  if (t === null || t === undefined) return "";
  return new Date(t * 1000).toISOString().replace("T", " ").slice(0, 19);
}

function ago(seconds) {
  if (seconds === null || seconds === undefined) return "";
  if (seconds < 60) return seconds.toFixed(1) + " s";
  if (seconds < 3600) return Math.floor(seconds / 60) + " min";
  return (seconds / 3600).toFixed(1) + " h";
}

function show(value) {
  return typeof value === "string" ? value : JSON.stringify(value, null, 2);
}

function toast(text, bad) {
  const t = document.getElementById("toast");
  t.textContent = text;
  t.className = bad ? "bad" : "";
  t.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { t.hidden = true; }, 6000);
}

function setLink(ok, text) {
  const l = document.getElementById("link");
  l.className = "link " + (ok ? "ok" : "bad");
  l.textContent = text;
}

class HttpError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path, body) {
  const init = body === undefined ? {} : {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body),
  };
  const r = await fetch("/api/" + path, init);
  let doc = {};
  try { doc = await r.json(); } catch (e) { doc = {error: r.statusText}; }
  if (r.status === 401) { login(); throw new HttpError(401, doc.error); }
  if (!r.ok) {
    if (r.status === 503) setLink(false, "master unreachable");
    throw new HttpError(r.status, doc.error || r.statusText);
  }
  setLink(true, "live");
  return doc;
}

function every(ms, fn) {
  const mine = view;
  const run = async () => {
    if (mine !== view) return;
    try { await fn(mine); } catch (e) { if (e.status !== 401) console.warn(e); }
    if (mine === view) timer = setTimeout(run, ms);
  };
  run();
}

function stateTag(s) { return h("span", {class: "state " + s}, s); }
function taskLink(id) { return h("a", {href: "#/task/" + id, class: "mono"}, id); }

async function control(path, what) {
  try {
    const doc = await api(path, {});
    toast(what + ": " + (doc.outcome || (doc.paused === undefined ? "done" : (doc.paused ? "paused" : "resumed"))));
    return doc;
  } catch (e) {
    if (e.status !== 401) toast(what + " refused: " + e.message, true);
    return null;
  }
}

// -- login (only when the dashboard has a token) -------------------------------------------
function login() {
  view++;
  clearTimeout(timer);
  setLink(false, "log in");
  const input = h("input", {type: "password", id: "token", placeholder: "dashboard token", autocomplete: "current-password"});
  const form = h("form", {class: "login", onsubmit: async (ev) => {
    ev.preventDefault();
    const r = await fetch("/login", {method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify({token: input.value})});
    if (r.ok) { can = (await api("info")).can || {}; route(); } else toast("wrong token", true);
  }}, h("h2", {}, "This dashboard needs its token"), input, h("button", {class: "primary", type: "submit"}, "Log in"));
  main.replaceChildren(form);
  input.focus();
}

// -- overview ------------------------------------------------------------------------------
function slotsCell(w) {
  const kinds = Object.keys(w.slots || {}).sort();
  return kinds.map((k) => {
    const slots = w.slots[k], running = (w.started || {})[k] || 0, busy = (w.busy || {})[k] || 0;
    const pct = slots ? Math.min(100, 100 * running / slots) : 0;
    return h("div", {class: "slots", "data-kind": k},
      h("span", {class: "bar"}, h("span", {style: null, "data-pct": pct})),
      `${k} ${running}/${slots} busy` + (busy > running ? ` (+${busy - running} sent)` : ""));
  });
}

function workersTable(workers) {
  if (!workers.length) return h("div", {class: "empty", id: "no-workers"}, "no workers connected");
  return h("table", {id: "workers"},
    h("tr", {}, ["worker", "host", "queues", "slots", "offers", "heartbeat", "connected", ""].map((t) => h("th", {}, t))),
    workers.map((w) => h("tr", {"data-worker": w.worker_id},
      h("td", {class: "mono"}, w.worker_id, w.draining ? h("span", {class: "tag draining"}, "draining") : null),
      h("td", {}, `${w.host} (pid ${w.pid})`),
      h("td", {}, (w.queues || []).join(", ")),
      h("td", {}, slotsCell(w)),
      h("td", {title: (w.offers || []).join("\n")}, w.offers ? `${w.offers.length} names` : "every name"),
      h("td", {class: "num"}, ago(w.last_heartbeat_s) + " ago"),
      h("td", {class: "num"}, ago(w.connected_s)),
      h("td", {}, can.worker_control ? [
        h("button", {class: "worker-drain", disabled: w.draining, onclick: async () => {
          if (confirm(`Drain worker ${w.worker_id}? It takes no more tasks, finishes the running ones and exits.`)) {
            await control(`workers/${encodeURIComponent(w.worker_id)}/drain`, `drain ${w.worker_id}`);
          }
        }}, "Drain"),
        h("button", {class: "worker-stop", onclick: async () => {
          if (confirm(`Stop worker ${w.worker_id} now? What runs on it is handed back.`)) {
            await control(`workers/${encodeURIComponent(w.worker_id)}/stop`, `stop ${w.worker_id}`);
          }
        }}, "Stop")] : null),
    )));
}

function queuesTable(queues) {
  if (!queues.length) return h("div", {class: "empty"}, "no queues yet");
  return h("table", {id: "queues"},
    h("tr", {}, ["queue", "pending", "by kind", "workers", "finished / s (1 min)", ""].map((t) => h("th", {}, t))),
    queues.map((q) => h("tr", {"data-queue": q.queue},
      h("td", {class: "mono"}, q.queue, q.paused ? h("span", {class: "tag paused"}, "paused") : null),
      h("td", {class: "num", "data-pending": q.pending}, q.pending),
      h("td", {}, Object.entries(q.depth).map(([k, n]) => `${k} ${n}`).join(", ")),
      h("td", {class: "num"}, q.workers),
      h("td", {class: "num"}, q.rate_per_s.toFixed(2)),
      h("td", {}, h("button", {class: "queue-action", onclick: async () => {
        await control(`queues/${encodeURIComponent(q.queue)}/${q.paused ? "resume" : "pause"}`, `queue ${q.queue}`);
      }}, q.paused ? "Resume" : "Pause"),
      can.queue_purge && q.pending ? h("button", {class: "queue-purge", onclick: async () => {
        const path = `queues/${encodeURIComponent(q.queue)}/purge`;
        try {
          const dry = await api(path, {dry_run: true});
          if (confirm(`Cancel the ${dry.count} pending tasks of queue ${q.queue}?`)) {
            const done = await api(path, {});
            toast(`queue ${q.queue}: ${done.count} pending tasks cancelled`);
          }
        } catch (e) { if (e.status !== 401) toast("purge refused: " + e.message, true); }
      }}, "Purge") : null),
    )));
}

function schedulesTable(schedules) {
  if (!schedules.length) return h("div", {class: "empty"}, "no schedules");
  return h("table", {id: "schedules"},
    h("tr", {}, ["schedule", "task", "when", "queue", "next (UTC)", "last run", ""].map((t) => h("th", {}, t))),
    schedules.map((x) => h("tr", {"data-schedule": x.name},
      h("td", {class: "mono"}, x.name, x.paused ? h("span", {class: "tag paused"}, "paused") : null),
      h("td", {class: "mono"}, x.task),
      h("td", {}, x.cron ? `cron ${x.cron}` + (x.timezone && x.timezone !== "UTC" ? ` (${x.timezone})` : "") : `every ${x.every_s} s`),
      h("td", {}, (x.options || {}).queue || "default"),
      h("td", {}, when(x.next_tick)),
      h("td", {}, x.last_task ? [taskLink(x.last_task), " ", stateTag(x.last_state || "")] : "",
        x.last_error ? h("div", {class: "state FAILED"}, x.last_error) : null),
      h("td", {}, h("button", {class: "schedule-action", onclick: async () => {
        await control(`schedules/${encodeURIComponent(x.name)}/${x.paused ? "resume" : "pause"}`, `schedule ${x.name}`);
      }}, x.paused ? "Resume" : "Pause")))));
}

function limitsTable(limits) {
  if (!limits.length) return h("div", {class: "empty"}, "no rate limits");
  return h("table", {id: "limits"},
    h("tr", {}, ["task", "rate", "started in the current window"].map((t) => h("th", {}, t))),
    limits.map((l) => h("tr", {"data-limit": l.name},
      h("td", {class: "mono"}, l.name), h("td", {}, l.rate || `${l.count}/${l.period_s} s`), h("td", {class: "num"}, l.in_window))));
}

function makeChart(el, title, series, data) {
  const width = Math.max(300, el.clientWidth - 16);
  return new uPlot({
    title, width, height: 200,
    scales: {x: {time: true}},
    series: [{}, ...series.map(([label, stroke]) => ({label, stroke, width: 2, spanGaps: false}))],
    axes: [{}, {size: 60}],
  }, data, el);
}

function drawCharts(s) {
  const data1 = [s.t, s.finished_per_s, s.submitted_per_s];
  const data2 = [s.t, s.duration_p50_ms, s.duration_max_ms];
  if (charts.length && charts[0].root.isConnected) {
    charts[0].setData(data1);
    charts[1].setData(data2);
    return;
  }
  const c1 = document.getElementById("chart-rate"), c2 = document.getElementById("chart-duration");
  c1.replaceChildren();
  c2.replaceChildren();
  charts = [
    makeChart(c1, "tasks per second", [["finished", "#2f6fde"], ["submitted", "#9ca3af"]], data1),
    makeChart(c2, "task run time, ms", [["median", "#1f9d55"], ["longest", "#d64545"]], data2),
  ];
}

function overview() {
  charts = [];
  const counts = h("div", {class: "cards", id: "counts"});
  const workers = h("div", {id: "workers-box"});
  const queues = h("div", {id: "queues-box"});
  const unserved = h("div", {id: "unserved"});
  const later = h("div", {id: "schedules-box"});
  main.replaceChildren(
    h("h2", {}, "Tasks"), counts,
    h("div", {class: "charts"},
      h("div", {class: "chart", id: "chart-rate"}, h("div", {class: "empty"}, "tasks per second: the first samples come within seconds")),
      h("div", {class: "chart", id: "chart-duration"}, h("div", {class: "empty"}, "task run time"))),
    h("h2", {}, "Workers"), workers,
    h("h2", {}, "Queues"), queues, unserved, later);
  every(2000, async (mine) => {
    const d = await api("overview");
    if (mine !== view) return;
    const open = ["PENDING", "DISPATCHED", "RUNNING"];
    counts.replaceChildren(
      ...STATES.filter((s) => open.includes(s) || d.counts[s] !== undefined).map((s) =>
        h("a", {class: "card", href: "#/tasks?state=" + s, id: "count-" + s},
          h("div", {class: "n"}, d.counts[s] || 0), h("div", {class: "l"}, s))),
      h("div", {class: "card", id: "count-workers"}, h("div", {class: "n"}, d.workers.length), h("div", {class: "l"}, "workers")),
      h("div", {class: "card"}, h("div", {class: "n"}, d.submitted_total), h("div", {class: "l"}, "submitted since start")));
    workers.replaceChildren(workersTable(d.workers));
    for (const bar of workers.querySelectorAll("[data-pct]")) bar.style.width = bar.dataset.pct + "%";
    queues.replaceChildren(queuesTable(d.queues));
    unserved.replaceChildren(...(d.unserved.length ? [h("h2", {}, "Pending tasks no connected worker can take"),
      h("table", {}, h("tr", {}, ["name", "queue", "kind", "pending"].map((t) => h("th", {}, t))),
        d.unserved.map((u) => h("tr", {}, h("td", {class: "mono"}, u.name), h("td", {}, u.queue), h("td", {}, u.kind), h("td", {class: "num"}, u.pending))))] : []));
    later.replaceChildren(
      ...(d.schedules ? [h("h2", {}, "Schedules"), schedulesTable(d.schedules)] : []),
      ...(d.limits ? [h("h2", {}, "Rate limits"), limitsTable(d.limits)] : []));
    if (d.series.t.length >= 2) drawCharts(d.series);
  });
}

// -- task list -----------------------------------------------------------------------------
function progressCell(p) {
  const fraction = progressFraction(p);
  if (fraction === null) return "";
  return h("span", {}, h("span", {class: "bar"}, h("span", {"data-pct": 100 * fraction})), Math.round(100 * fraction) + "%");
}

function progressFraction(p) {
  if (p === null || p === undefined) return null;
  const f = typeof p === "number" ? p : (p.fraction ?? p.value ?? p.done);
  return typeof f === "number" ? Math.max(0, Math.min(1, f)) : null;
}

function progressMessage(p) {
  return p && typeof p === "object" ? (p.message ?? p.text ?? "") : "";
}

function paintBars(root) {
  for (const bar of root.querySelectorAll("[data-pct]")) bar.style.width = bar.dataset.pct + "%";
}

function tasks(params) {
  const states = new Set(params.getAll("state"));
  const field = (name, label, placeholder) => h("label", {}, label,
    h("input", {name, value: params.get(name) || "", placeholder}));
  const form = h("form", {class: "filters", id: "filters", onsubmit: (ev) => {
    ev.preventDefault();
    const q = new URLSearchParams();
    for (const el of form.querySelectorAll("input[name=state]:checked")) q.append("state", el.value);
    for (const n of ["name", "queue", "worker", "since", "limit"]) {
      const v = form.elements[n].value.trim();
      if (v) q.set(n, v);
    }
    location.hash = "#/tasks?" + q.toString();
  }},
  h("div", {class: "states"}, STATES.map((s) => h("label", {}, h("input", {type: "checkbox", name: "state", value: s, checked: states.has(s)}), s))),
  field("name", "name", "module:function"), field("queue", "queue", ""), field("worker", "worker", "worker id"),
  field("since", "since", "10m, 2h, 1d"), field("limit", "limit", "50"),
  h("button", {class: "primary", type: "submit"}, "Filter"));
  const box = h("div", {id: "task-list"}, h("div", {class: "empty"}, "loading"));
  main.replaceChildren(form, box);
  every(3000, async (mine) => {
    const d = await api("tasks?" + params.toString());
    if (mine !== view) return;
    const withProgress = d.tasks.some((t) => t.progress);
    const rows = d.tasks.map((t) => h("tr", {"data-task": t.id, "data-state": t.state},
      h("td", {}, taskLink(t.id)), h("td", {}, stateTag(t.state)), h("td", {class: "mono"}, t.name),
      h("td", {}, t.queue), h("td", {}, t.kind), h("td", {class: "num"}, t.attempt), h("td", {class: "mono"}, t.worker_id || ""),
      h("td", {}, when(t.created_at)), h("td", {class: "num"}, t.duration_ms === undefined ? "" : t.duration_ms.toFixed(1)),
      withProgress ? h("td", {}, progressCell(t.progress), " ", progressMessage(t.progress)) : null));
    const next = d.next ? (() => { const q = new URLSearchParams(params); q.set("before", d.next); return "#/tasks?" + q; })() : null;
    box.replaceChildren(
      d.tasks.length ? h("table", {id: "tasks"},
        h("tr", {}, ["task", "state", "name", "queue", "kind", "attempt", "worker", "created (UTC)", "ms", withProgress ? "progress" : null].map((t) => t && h("th", {}, t))),
        rows) : h("div", {class: "empty", id: "no-tasks"}, "no tasks"),
      h("div", {class: "pager"},
        params.get("before") ? h("a", {href: "#/tasks?" + (() => { const q = new URLSearchParams(params); q.delete("before"); return q; })()}, "newest") : null,
        next ? h("a", {href: next, id: "next-page"}, "older") : null));
    paintBars(box);
  });
}

// -- one task ------------------------------------------------------------------------------
// The task's output (stdout, stderr, logging), where the master keeps it: read after the
// offset already shown, so following a running task fetches only what is new.
class Output {
  constructor(id) { this.id = id; this.text = ""; this.after = 0; this.lost = false; this.done = false; }
  async update() {
    if (!can.task_output || this.done) return;
    const d = await api(`tasks/${encodeURIComponent(this.id)}/logs?after=${this.after}`);
    if (d.end < this.after) { this.text = ""; this.after = 0; return this.update(); }  // a new attempt
    if (d.start > this.after) this.lost = true;
    this.text += d.output || "";
    this.after = d.end;
    this.done = !!d.final;
  }
  block(state) {
    if (!can.task_output) return [];
    const title = "Output" + (FINAL.has(state) ? "" : " (following)") + (this.lost ? " (the start is no longer kept)" : "");
    return [h("h2", {}, title), this.text ? h("pre", {id: "logs"}, this.text) : h("div", {class: "empty", id: "logs-empty"}, "no output")];
  }
}

function taskView(id) {
  const box = h("div", {id: "task"}, h("div", {class: "empty"}, "loading"));
  main.replaceChildren(box);
  let finalSeen = false;
  const output = new Output(id);
  every(1000, async (mine) => {
    if (finalSeen) return;
    const t = await api("tasks/" + encodeURIComponent(id));
    try { await output.update(); } catch (e) { if (e.status !== 401) console.warn(e); }
    if (mine !== view) return;
    finalSeen = FINAL.has(t.state);
    const opts = Object.entries(t.options || {}).map(([k, v]) => `${k}=${v}`).join(" ") || "(the workers' declared defaults)";
    const fields = [
      ["id", h("span", {class: "mono", id: "task-id"}, t.id)], ["name", h("span", {class: "mono"}, t.name)],
      ["queue", t.queue], ["kind", t.kind], ["options", opts],
      ["state", h("span", {}, h("span", {id: "task-state", class: "state " + t.state}, t.state), t.cancel_requested ? " (cancel requested)" : "")],
      ["attempt", t.attempt], ["worker", t.worker_id || ""], ["created", when(t.created_at) + " UTC"],
      t.finished_at !== undefined ? ["finished", when(t.finished_at) + " UTC"] : null,
      t.duration_ms !== undefined ? ["duration", t.duration_ms.toFixed(1) + " ms"] : null,
      t.expires_at !== undefined ? ["result kept until", when(t.expires_at) + " UTC"] : null,
      ["failures / lost", `${t.failures ?? 0} / ${t.lost ?? 0}`],
      t.progress !== undefined && t.progress !== null ? ["progress", h("span", {id: "progress"}, progressCell(t.progress), " ", progressMessage(t.progress))] : null,
    ].filter(Boolean);
    const parts = [
      h("h2", {}, "Task"),
      h("dl", {class: "fields"}, fields.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)])),
      h("div", {class: "actions"},
        !FINAL.has(t.state) ? h("button", {class: "danger", id: "cancel", onclick: async () => {
          if (await control(`tasks/${t.id}/cancel`, "cancel")) { finalSeen = false; }
        }}, "Cancel") : null,
        FINAL.has(t.state) && t.state !== "SUCCEEDED" ? h("button", {id: "retry", onclick: async () => {
          const r = await control(`tasks/${t.id}/retry`, "retry");
          if (r && r.new_id) location.hash = "#/task/" + r.new_id;
        }}, "Retry as a new task") : null),
    ];
    const payload = t.payload;
    if (Array.isArray(payload) && payload.length === 2) {
      parts.push(h("h2", {}, "Arguments"), h("pre", {id: "args"}, show(payload[0]) + (Object.keys(payload[1] || {}).length ? "\nkwargs: " + show(payload[1]) : "")));
    } else if (payload !== undefined) {
      parts.push(h("h2", {}, "Payload"), h("pre", {id: "args"}, show(payload)));
    } else if (t.state === "SUCCEEDED") {
      parts.push(h("h2", {}, "Arguments"), h("div", {class: "empty"}, "not kept once a task has succeeded"));
    }
    if (t.state === "SUCCEEDED") parts.push(h("h2", {}, "Result"), h("pre", {id: "result"}, show(t.value)));
    if (t.error) {
      parts.push(h("h2", {}, "Error"), h("pre", {id: "error"}, `${t.error.type}: ${t.error.message}`));
      if (t.error.traceback) parts.push(h("h2", {}, "Traceback"), h("pre", {id: "traceback"}, t.error.traceback));
    }
    parts.push(...output.block(t.state));
    if ((t.attempts || []).length) {
      parts.push(h("h2", {}, "Attempts"), h("table", {id: "attempts"},
        h("tr", {}, ["#", "worker", "started (UTC)", "ended (UTC)", "outcome"].map((x) => h("th", {}, x))),
        t.attempts.map((a) => h("tr", {}, h("td", {class: "num"}, a.attempt), h("td", {class: "mono"}, a.worker_id || ""),
          h("td", {}, when(a.started_at)), h("td", {}, when(a.ended_at)), h("td", {}, a.outcome)))));
    }
    const logs = box.querySelector("#logs");
    const atEnd = logs ? logs.scrollTop + logs.clientHeight >= logs.scrollHeight - 4 : true;
    box.replaceChildren(...parts);
    paintBars(box);
    const fresh = box.querySelector("#logs");
    if (fresh && atEnd) fresh.scrollTop = fresh.scrollHeight;
  });
}

// -- routing -------------------------------------------------------------------------------
function route() {
  view++;
  clearTimeout(timer);
  document.getElementById("toast").hidden = true;
  const hash = location.hash.replace(/^#/, "") || "/";
  const [path, query] = hash.split("?");
  const params = new URLSearchParams(query || "");
  const name = path.startsWith("/tasks") ? "tasks" : path.startsWith("/task/") ? "task" : "overview";
  for (const a of document.querySelectorAll("[data-nav]")) a.classList.toggle("active", a.dataset.nav === (name === "task" ? "tasks" : name));
  if (name === "tasks") tasks(params);
  else if (name === "task") taskView(decodeURIComponent(path.slice("/task/".length)));
  else overview();
}

async function start() {
  window.addEventListener("hashchange", route);
  try { can = (await api("info")).can || {}; } catch (e) { if (e.status === 401) return; }
  route();
}

start();
