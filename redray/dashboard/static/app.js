// redray dashboard: renders each page from the JSON API and polls it (live refresh).
"use strict";

const REFRESH_MS = Number(new URLSearchParams(location.search).get("refresh")) || 2000;
const state = { expanded: new Set(), logNode: "", logFile: "", timer: null };

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "className") node.className = value;
    else node.setAttribute(key, value);
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function short(id) { return id ? String(id).slice(0, 12) : ""; }

function bytes(n) {
  if (n === undefined || n === null) return "?";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return (i ? n.toFixed(2) : n.toFixed(0)) + units[i];
}

function duration(start, end) {
  if (!start) return "";
  const ms = (end || Date.now()) - start;
  return ms < 1000 ? ms + " ms" : (ms / 1000).toFixed(2) + " s";
}

function when(ms) { return ms ? new Date(ms).toLocaleTimeString() : ""; }

function badge(text) {
  return el("span", { className: "badge state-" + String(text || "").toLowerCase() }, text || "");
}

function table(id, headers, rows) {
  return el("table", { id },
    el("thead", {}, el("tr", {}, headers.map((h) => el("th", {}, h)))),
    el("tbody", {}, rows));
}

function counts(title, id, map) {
  const entries = Object.entries(map || {});
  return el("div", { className: "card", id },
    el("h3", {}, title),
    entries.length ? el("ul", {}, entries.map(([k, v]) => el("li", {}, badge(k), " ", String(v))))
      : el("p", { className: "muted" }, "none"));
}

async function api(path) {
  const response = await fetch(path, { credentials: "same-origin" });
  if (response.status === 401) { location.href = "/login"; throw new Error("unauthorized"); }
  if (!response.ok) {
    let message = response.statusText;
    try { message = (await response.json()).error || message; } catch (e) { /* not JSON */ }
    throw new Error(message);
  }
  const type = response.headers.get("Content-Type") || "";
  return type.includes("json") ? response.json() : response.text();
}

function warnings(data) {
  const list = [...(data.warnings || []), ...(data.partial_failures || [])];
  return list.length ? el("div", { className: "warning" }, list.map((w) => el("p", {}, w))) : null;
}

// -- pages -------------------------------------------------------------------------------
const pages = {
  async overview() {
    const data = await api("/api/overview");
    const rows = data.nodes.map((n) => {
      const total = n.resources_total || {};
      const free = n.resources_available || {};
      const load = n.load || {};
      const used = (name) => total[name] !== undefined
        ? ((total[name] - (free[name] ?? total[name])).toFixed(1) + " / " + total[name].toFixed(1)) : "-";
      const cpuUtil = load.cpu_percent !== undefined ? " (" + load.cpu_percent.toFixed(0) + "% host)" : "";
      return el("tr", { "data-id": n.node_id },
        el("td", { className: "mono", title: n.node_id }, short(n.node_id)),
        el("td", {}, n.node_ip || ""),
        el("td", {}, n.is_head_node ? "head" : "worker"),
        el("td", {}, badge(n.state), n.state_message ? " " + n.state_message : ""),
        el("td", {}, used("CPU") + cpuUtil),
        el("td", {}, used("GPU")),
        el("td", {}, load.mem_used !== undefined ? bytes(load.mem_used) + " / " + bytes(load.mem_total) : "-"),
        el("td", {}, load.store_used !== undefined
          ? bytes(load.store_used) + " / " + bytes(load.store_capacity ?? n.object_store_memory) : "-"),
        el("td", {}, load.spilled_bytes !== undefined ? bytes(load.spilled_bytes) : "-"),
        el("td", {}, load.workers ?? "-"),
        el("td", {}, load.leases ?? "-"));
    });
    const alive = data.nodes.filter((n) => n.state === "ALIVE").length;
    return [
      el("h2", {}, "Cluster ", el("span", { className: "mono" }, data.cluster)),
      warnings(data),
      el("div", { className: "cards" },
        counts("Nodes", "nodes-summary", { ALIVE: alive, DEAD: data.nodes.length - alive }),
        counts("Tasks", "tasks-summary", data.tasks),
        counts("Actors", "actors-summary", data.actors),
        counts("Placement groups", "pgs-summary", data.placement_groups),
        counts("Jobs", "jobs-summary", data.jobs)),
      el("h3", {}, "Nodes"),
      table("nodes-table", ["Node", "IP", "Role", "State", "CPU used / total", "GPU", "Memory (host)",
        "Object store", "Spilled", "Workers", "Leases"], rows),
    ];
  },

  async jobs() {
    const data = await api("/api/jobs");
    const rows = data.result.map((j) => el("tr", { "data-id": j.job_id },
      el("td", { className: "mono" }, j.job_id),
      el("td", {}, badge(j.status)),
      el("td", {}, (j.driver_info || {}).node_ip_address || ""),
      el("td", {}, (j.driver_info || {}).pid || ""),
      el("td", {}, when(j.start_time)),
      el("td", {}, when(j.end_time)),
      el("td", {}, duration(j.start_time, j.end_time))));
    return [el("h2", {}, "Jobs"), warnings(data),
      table("jobs-table", ["Job", "Status", "Driver IP", "Driver pid", "Started", "Ended", "Duration"], rows)];
  },

  async actors() {
    const data = await api("/api/actors");
    const rows = data.result.map((a) => el("tr", { "data-id": a.actor_id },
      el("td", { className: "mono", title: a.actor_id }, short(a.actor_id)),
      el("td", {}, a.class_name || ""),
      el("td", {}, a.name || ""),
      el("td", {}, badge(a.state)),
      el("td", {}, a.num_restarts ?? 0),
      el("td", { className: "mono", title: a.node_id || "" }, short(a.node_id)),
      el("td", {}, a.pid ?? ""),
      el("td", { className: "mono" }, a.job_id || ""),
      el("td", { className: "cause" },
        ((a.death_cause || {}).actor_died_error_context || {}).error_message || "")));
    return [el("h2", {}, "Actors"), warnings(data),
      table("actors-table", ["Actor", "Class", "Name", "State", "Restarts", "Node", "pid", "Job",
        "Death cause"], rows)];
  },

  async tasks() {
    const params = new URLSearchParams(location.search);
    const query = new URLSearchParams();
    for (const key of ["state", "name", "job_id"]) if (params.get(key)) query.set(key, params.get(key));
    query.set("limit", params.get("limit") || "500");
    const data = await api("/api/tasks?" + query);
    const form = el("form", { id: "task-filters", className: "filters", onsubmit: (event) => {
      event.preventDefault();
      const next = new URLSearchParams();
      for (const input of event.target.querySelectorAll("[name]")) if (input.value) next.set(input.name, input.value);
      history.pushState(null, "", "/tasks?" + next);
      refresh();
    } },
    el("select", { name: "state", id: "filter-state" }, ["", "PENDING_ARGS_AVAIL", "PENDING_NODE_ASSIGNMENT",
      "SUBMITTED_TO_WORKER", "RUNNING", "FINISHED", "FAILED"].map((s) => {
      const option = el("option", { value: s }, s || "any state");
      if (s === (params.get("state") || "")) option.selected = true;
      return option;
    })),
    el("input", { name: "name", id: "filter-name", placeholder: "name", value: params.get("name") || "" }),
    el("input", { name: "job_id", id: "filter-job", placeholder: "job id", value: params.get("job_id") || "" }),
    el("button", { type: "submit", id: "filter-apply" }, "Filter"));
    const rows = [];
    for (const t of data.result) {
      const key = t.task_id + ":" + t.attempt_number;
      rows.push(el("tr", { "data-id": t.task_id, className: "clickable", onclick: () => {
        if (state.expanded.has(key)) state.expanded.delete(key); else state.expanded.add(key);
        refresh();
      } },
      el("td", { className: "mono", title: t.task_id }, short(t.task_id)),
      el("td", {}, t.name || ""),
      el("td", {}, badge(t.state)),
      el("td", {}, t.attempt_number),
      el("td", {}, t.type || ""),
      el("td", { className: "mono" }, t.job_id || ""),
      el("td", { className: "mono", title: t.node_id || "" }, short(t.node_id)),
      el("td", {}, t.worker_pid ?? ""),
      el("td", {}, duration(t.start_time_ms, t.end_time_ms)),
      el("td", {}, t.error_type || "")));
      if (state.expanded.has(key) || (t.error_message && params.get("task_id") === t.task_id)) {
        rows.push(el("tr", { className: "detail" }, el("td", { colspan: 10 },
          el("p", {}, "Task ", el("span", { className: "mono" }, t.task_id), " attempt ", t.attempt_number,
            ", created ", when(t.creation_time_ms), ", started ", when(t.start_time_ms), ", ended ", when(t.end_time_ms)),
          t.error_message ? el("pre", { className: "traceback" }, t.error_message) : el("p", { className: "muted" }, "no error"))));
      }
    }
    return [el("h2", {}, "Tasks"), form, warnings(data),
      el("p", { className: "muted" }, data.result.length + " shown of " + (data.num_filtered ?? "more than " + data.result.length)
        + " matching (" + data.total + " stored); click a row for its details and error."),
      table("tasks-table", ["Task", "Name", "State", "Attempt", "Type", "Job", "Node", "pid", "Duration", "Error"], rows)];
  },

  async "placement-groups"() {
    const data = await api("/api/placement_groups");
    const rows = data.result.map((g) => el("tr", { "data-id": g.placement_group_id },
      el("td", { className: "mono", title: g.placement_group_id }, short(g.placement_group_id)),
      el("td", {}, g.name || ""),
      el("td", {}, badge(g.state)),
      el("td", {}, (g.stats || {}).scheduling_strategy || ""),
      el("td", {}, (g.bundles || []).map((b) =>
        el("div", {}, "#" + b.bundle_id + " " + JSON.stringify(b.unit_resources) + (b.node_id ? " on " + short(b.node_id) : "")))),
      el("td", { className: "mono" }, g.creator_job_id || ""),
      el("td", {}, g.is_detached ? "detached" : "")));
    return [el("h2", {}, "Placement groups"), warnings(data),
      table("pgs-table", ["Group", "Name", "State", "Strategy", "Bundles", "Job", "Lifetime"], rows)];
  },

  async logs() {
    const nodes = (await api("/api/overview")).nodes.filter((n) => n.state === "ALIVE");
    if (!state.logNode && nodes.length) state.logNode = (nodes.find((n) => n.is_head_node) || nodes[0]).node_id;
    const files = state.logNode ? (await api("/api/logs?node_id=" + state.logNode)).result : {};
    const select = el("select", { id: "log-node", onchange: (event) => {
      state.logNode = event.target.value; state.logFile = ""; refresh();
    } }, nodes.map((n) => {
      const option = el("option", { value: n.node_id }, short(n.node_id) + " " + (n.node_ip || ""));
      if (n.node_id === state.logNode) option.selected = true;
      return option;
    }));
    const list = el("ul", { id: "log-files", className: "files" });
    for (const [category, names] of Object.entries(files)) {
      for (const name of names) {
        list.append(el("li", {}, el("a", { href: "#", "data-file": name,
          className: name === state.logFile ? "current" : "", onclick: (event) => {
            event.preventDefault(); state.logFile = name; refresh();
          } }, name), el("span", { className: "muted" }, " " + category)));
      }
    }
    let viewer = el("p", { className: "muted" }, "Choose a file.");
    if (state.logFile) {
      const text = await api("/api/logs/file?node_id=" + state.logNode + "&filename="
        + encodeURIComponent(state.logFile) + "&tail=1000");
      viewer = el("pre", { id: "log-text", className: "log" }, text || "(empty)");
    }
    return [el("h2", {}, "Logs"), el("p", {}, "Node ", select),
      el("div", { className: "split" }, list, el("div", { className: "viewer" },
        state.logFile ? el("h3", {}, state.logFile, " (last 1000 lines)") : null, viewer))];
  },
};

function currentPage() {
  const path = location.pathname.replace(/\/+$/, "");
  return path === "" ? "overview" : path.slice(1);
}

let refreshing = false;
async function refresh() {
  if (refreshing) return;
  refreshing = true;
  const page = currentPage();
  const status = document.getElementById("status");
  try {
    const content = await (pages[page] || pages.overview)();
    const main = document.getElementById("main");
    const scroll = document.querySelector("pre.log");
    const atBottom = scroll && scroll.scrollTop + scroll.clientHeight >= scroll.scrollHeight - 5;
    main.replaceChildren(...content.filter(Boolean));
    const log = document.querySelector("pre.log");
    if (log && (atBottom || !scroll)) log.scrollTop = log.scrollHeight;
    status.textContent = "updated " + new Date().toLocaleTimeString();
    status.className = "status ok";
  } catch (error) {
    status.textContent = "refresh failed: " + error.message;
    status.className = "status failed";
  } finally {
    refreshing = false;
  }
}

window.addEventListener("popstate", refresh);
document.querySelectorAll("nav a[data-page]").forEach((a) => {
  if (a.dataset.page === currentPage()) a.classList.add("current");
});
refresh();
state.timer = setInterval(refresh, REFRESH_MS);
