// The lorafleet dashboard: a hash-routed page over the /v1 API. The API key lives in sessionStorage
// (this tab only) and goes out only as the Authorization header; the static files hold no data.
import { LineChart } from "/ui/chart.js";
import { followStream } from "/ui/sse.js";

const KEY = "lorafleet.api_key";
const ROLE = "lorafleet.role";
const STATUSES = ["queued", "running", "paused", "succeeded", "failed", "cancelled"];
const FINISHED = new Set(["succeeded", "failed", "cancelled"]);
const $ = (sel, root = document) => root.querySelector(sel);
const view = () => $("#view");

let leave = () => {};  // stops the current page's timers and streams

// ------------------------------------------------------------------------------------------- helpers
function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "class") node.className = v;
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat(Infinity)) if (c !== null && c !== undefined) node.append(c instanceof Node ? c : String(c));
  return node;
}

function table(headers, rows, caption) {
  return h("table", {},
    caption ? h("caption", {}, caption) : null,
    h("thead", {}, h("tr", {}, headers.map((t) => h("th", { scope: "col" }, t)))),
    h("tbody", {}, rows.length ? rows : h("tr", {}, h("td", { colspan: headers.length, class: "muted" }, "none"))));
}

const time = (s) => (s ? new Date(s * 1000).toLocaleString() : "—");
const dash = (v) => (v === null || v === undefined || v === "" ? "—" : v);
function duration(s) {
  if (s === null || s === undefined) return "—";
  s = Math.round(s);
  return s >= 3600 ? `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`
    : s >= 60 ? `${Math.floor(s / 60)}m ${s % 60}s` : `${s}s`;
}
function bytes(n) {
  if (n === null || n === undefined) return "—";
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}
const badge = (status) => h("span", { class: `status status-${status}` }, status);

function progressCell(job) {
  const p = job.progress;
  if (!p) return "—";
  const pct = p.percent ?? 0;
  return h("span", { class: "progress" },
    h("progress", { max: 100, value: pct, "aria-label": `${pct}% done` }),
    ` ${p.step}${p.total_steps ? "/" + p.total_steps : ""}`);
}

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path, { method = "GET", body, raw = false } = {}) {
  const headers = { Authorization: `Bearer ${sessionStorage.getItem(KEY)}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  if (!response.ok) {
    const err = await response.json().catch(() => ({}));
    if (response.status === 401 && sessionStorage.getItem(KEY)) signOut("Your key was refused (401); sign in again.");
    throw new ApiError(response.status, err.error?.message || `${method} ${path} answered ${response.status}`);
  }
  return raw ? response : response.json();
}

function showError(e, where = view()) {
  where.append(h("p", { class: "error", role: "alert" }, e.message));
}

function every(ms, fn) {
  const id = setInterval(fn, ms);
  return () => clearInterval(id);
}

// ------------------------------------------------------------------------------------------- sign-in
async function detectRole() {
  try { await api("/v1/admin/cluster"); return "operator"; } catch (e) { if (e.status === 401) throw e; }
  await api("/v1/fine_tuning/jobs?limit=1");
  try { await api("/v1/admin/tenants"); return "admin"; } catch (e) { if (e.status === 401) throw e; }
  return "member";
}

async function signIn(event) {
  event.preventDefault();
  const input = $("#api-key");
  sessionStorage.setItem(KEY, input.value.trim());
  try {
    const role = await detectRole();
    sessionStorage.setItem(ROLE, role);
    input.value = "";
    $("#sign-in-error").textContent = "";
    location.hash = role === "operator" ? "#/cluster" : "#/jobs";
    route();
  } catch (e) {
    sessionStorage.removeItem(KEY);
    $("#sign-in-error").textContent = `Sign-in failed: ${e.message}`;
  }
}

function signOut(message = "") {
  sessionStorage.removeItem(KEY);
  sessionStorage.removeItem(ROLE);
  $("#who").textContent = "";
  location.hash = "";
  route();
  $("#sign-in-error").textContent = message;
}

// ---------------------------------------------------------------------------------------------- jobs
async function jobsPage(params) {
  const status = params.get("status") || "";
  const filter = h("select", { id: "status-filter", onchange: (e) => {
    location.hash = e.target.value ? `#/jobs?status=${e.target.value}` : "#/jobs";
  } }, h("option", { value: "" }, "all"), STATUSES.map((s) => h("option", { value: s, selected: s === status }, s)));
  const body = h("div", { id: "jobs" });
  view().replaceChildren(h("h1", {}, "Fine-tuning jobs"),
    h("p", { class: "toolbar" }, h("label", { for: "status-filter" }, "Status "), filter), body);
  const load = async () => {
    try {
      const page = await api(`/v1/fine_tuning/jobs?limit=100${status ? "&status=" + status : ""}`);
      body.replaceChildren(table(["Job", "Model", "Status", "Progress", "ETA", "Queue", "Created"],
        page.data.map((j) => h("tr", { "data-job": j.id },
          h("td", {}, h("a", { href: `#/jobs/${j.id}` }, j.id)),
          h("td", {}, j.user_provided_suffix ? `${j.model} → ${j.user_provided_suffix}` : j.model),
          h("td", {}, badge(j.status)), h("td", {}, progressCell(j)),
          h("td", {}, FINISHED.has(j.status) ? "—" : duration(j.progress?.eta_seconds)),
          h("td", {}, dash(j.queue_position)), h("td", {}, time(j.created_at))))));
    } catch (e) { body.replaceChildren(); showError(e, body); }
  };
  await load();
  return every(3000, load);
}

function jobSummary(job) {
  const p = job.progress || {};
  const hidden = new Set(["step", "total_steps", "epoch", "tokens_trained"]);
  const metrics = Object.entries(p.metrics || {}).filter(([k]) => !hidden.has(k)).map(([k, v]) => `${k} ${typeof v === "number" ? v.toPrecision(4) : v}`);
  return h("dl", { class: "facts" },
    h("dt", {}, "Status"), h("dd", { id: "job-status" }, badge(job.status)),
    h("dt", {}, "Progress"), h("dd", {}, progressCell(job), p.percent !== undefined && p.percent !== null ? ` (${p.percent}%)` : ""),
    h("dt", {}, "ETA"), h("dd", {}, FINISHED.has(job.status) ? "—" : duration(p.eta_seconds)),
    h("dt", {}, "Queue position"), h("dd", {}, dash(job.queue_position)),
    h("dt", {}, "Model"), h("dd", {}, job.model),
    h("dt", {}, "Result"), h("dd", {}, job.fine_tuned_model
      ? h("a", { href: `#/adapters/${job.fine_tuned_model.split(":")[0]}` }, job.fine_tuned_model) : "—"),
    h("dt", {}, "LoRA"), h("dd", {}, job.lora ? `r=${job.rank_sweep ? job.rank_sweep.ranks.join(", ") + " (a rank sweep)" : job.lora.r} α=${job.lora.alpha} ${[].concat(job.lora.target_modules).join(", ")}` : "—"),
    h("dt", {}, "Resources"), h("dd", {}, `${job.resources.workers} worker(s) × ${job.resources.gpus_per_worker} GPU`),
    h("dt", {}, "Latest metrics"), h("dd", {}, metrics.join(", ") || "—"),
    h("dt", {}, "Attempt"), h("dd", {}, job.attempt),
    job.parent ? [h("dt", {}, "Rank sweep"), h("dd", {}, h("a", { href: `#/jobs/${job.parent}` }, job.parent))] : null,
    job.error ? [h("dt", {}, "Error"), h("dd", { class: "error" }, `${job.error.code}: ${job.error.message}`)] : null);
}

// The rank report of the version a job published, below its summary (loaded once the job has one).
async function jobRankReport(job, slot) {
  if (!job.fine_tuned_model || slot.dataset.ref === job.fine_tuned_model) return;
  slot.dataset.ref = job.fine_tuned_model;
  const [name, version] = job.fine_tuned_model.split(":");
  try { slot.replaceChildren(rankReportView((await api(`/v1/adapters/${name}/versions/${version}`)).rank_report)); }
  catch (e) { slot.replaceChildren(); showError(e, slot); }
}

async function jobPage(id) {
  const controller = new AbortController();
  const summary = h("div", { id: "job-summary" });
  const rankReport = h("div", { id: "job-rank-report" });
  const sweep = h("div", { id: "job-sweep" });
  const actions = h("div", { class: "actions", role: "group", "aria-label": "Job actions" });
  const notice = h("p", { id: "job-notice", role: "status" });
  const charts = h("div", { class: "charts" });
  const events = h("ol", { id: "events", class: "events", reversed: true });
  const checkpoints = h("div", { id: "checkpoints" });
  view().replaceChildren(h("p", {}, h("a", { href: "#/jobs" }, "← all jobs")), h("h1", {}, id), summary, sweep, rankReport, actions, notice,
    h("h2", {}, "Curves"), charts, h("h2", {}, "Checkpoints"), checkpoints, h("h2", {}, "Events"), events);
  const loss = new LineChart(charts, "Loss", [{ key: "train_loss", label: "training" }, { key: "val_loss", label: "validation" }]);
  loss.figure.id = "loss-chart";
  let accuracy = null;

  const act = (verb) => async () => {
    notice.textContent = "";
    try {
      const job = await api(`/v1/fine_tuning/jobs/${id}/${verb}`, { method: "POST" });
      showJob(job);
      notice.textContent = `${verb} requested; the job is ${job.status}.`;
    } catch (e) { notice.textContent = e.message; }
  };
  const showJob = (job) => {
    summary.replaceChildren(jobSummary(job));
    jobRankReport(job, rankReport);
    const done = FINISHED.has(job.status);
    actions.replaceChildren(
      h("button", { type: "button", id: "cancel", onclick: act("cancel"), disabled: done }, "Cancel"),
      h("button", { type: "button", id: "pause", onclick: act("pause"), disabled: done || job.status === "paused" || !!job.rank_sweep }, "Pause"),
      h("button", { type: "button", id: "resume", onclick: act("resume"), disabled: job.status !== "paused" }, "Resume"));
  };
  let checkpointsAt = 0;
  const loadCheckpoints = async () => {
    checkpointsAt = Date.now();
    try {
      const page = await api(`/v1/fine_tuning/jobs/${id}/checkpoints?limit=100`);
      const shown = (m) => Object.entries(m || {}).filter(([k]) => k !== "step")
        .map(([k, v]) => `${k} ${typeof v === "number" ? v.toPrecision(4) : v}`).join(", ");
      checkpoints.replaceChildren(table(["Step", "Checkpoint", "Metrics", "Created"],
        page.data.map((c) => h("tr", {}, h("td", {}, c.step_number), h("td", {}, c.fine_tuned_model_checkpoint),
          h("td", {}, dash(shown(c.metrics))), h("td", {}, time(c.created_at))))));
    } catch (e) { checkpoints.replaceChildren(); showError(e, checkpoints); }
  };
  const onEvent = (event) => {
    const d = event.data || {};
    if (event.type === "metrics" && typeof d.step === "number") {
      loss.add(d.step, d);
      const acc = { train_token_accuracy: d.train_mean_token_accuracy ?? d.train_token_accuracy, val_token_accuracy: d.val_token_accuracy };
      if (acc.train_token_accuracy !== undefined || acc.val_token_accuracy !== undefined) {
        accuracy ??= new LineChart(charts, "Token accuracy",
          [{ key: "train_token_accuracy", label: "training" }, { key: "val_token_accuracy", label: "validation" }]);
        accuracy.add(d.step, acc);
      }
    }
    events.prepend(h("li", { class: `event level-${event.level}` },
      h("time", { datetime: new Date(event.created_at * 1000).toISOString() }, time(event.created_at)), " ", event.message));
  };

  let job;
  try { job = await api(`/v1/fine_tuning/jobs/${id}`); showJob(job); } catch (e) { showError(e); return () => {}; }
  // A rank sweep's children, with their current statuses from GET (its stream carries the parent's own).
  const showSweep = (j) => sweep.replaceChildren(rankSweepView(j.rank_sweep.children, j.rank_sweep.chosen));
  let stopSweep = () => {};
  if (job.rank_sweep) {
    showSweep(job);
    stopSweep = every(3000, async () => {
      try { showSweep(await api(`/v1/fine_tuning/jobs/${id}`)); } catch (e) { showError(e, sweep); }
    });
  }
  loadCheckpoints();
  followStream(`/v1/fine_tuning/jobs/${id}/events/stream`, sessionStorage.getItem(KEY), (frame) => {
    const data = JSON.parse(frame.data);
    if (frame.event === "job" || frame.event === "end") {
      showJob(data);
      if (Date.now() - checkpointsAt > 3000) loadCheckpoints();
      if (frame.event === "end") { loadCheckpoints(); notice.textContent = `The job ended ${data.status}.`; }
    } else if (frame.event === "message") onEvent(data);
    else if (frame.event === "error") notice.textContent = data.message;
  }, controller.signal, (message) => { notice.textContent = message; });
  return () => { controller.abort(); stopSweep(); };
}

// ------------------------------------------------------------------------------------------ adapters
async function adaptersPage() {
  view().replaceChildren(h("h1", {}, "Adapters"));
  try {
    const page = await api("/v1/adapters");
    view().append(table(["Adapter", "Latest", "Versions", "Updated"], page.data.map((a) => h("tr", {},
      h("td", {}, h("a", { href: `#/adapters/${a.name}` }, a.name)), h("td", {}, a.latest_ref),
      h("td", {}, a.version_count), h("td", {}, time(a.updated_at))))));
  } catch (e) { showError(e); }
  return () => {};
}

async function download(name, version) {
  const response = await api(`/v1/adapters/${name}/versions/${version}/download`, { raw: true });
  const url = URL.createObjectURL(await response.blob());
  const link = h("a", { href: url, download: `${name}-v${version}.tar.gz` });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

// A version's rank report (docs/api.md, "Rank report"): the summary, then one row per adapted module.
function rankReportView(report) {
  if (!report) return h("p", { class: "muted", id: "rank-report" }, "No rank report (an imported version).");
  const shown = (values) => values.slice(0, 6).map((v) => v.toPrecision(3)).join(" ") + (values.length > 6 ? " …" : "");
  return h("section", { id: "rank-report", "aria-label": "Rank report" },
    h("h3", {}, "Rank report"),
    h("p", { id: "rank-verdict", class: `verdict verdict-${report.summary.verdict}` }, report.summary.message),
    table(["Module", "r", "Effective rank (90%)", "Effective rank (99%)", "Verdict", "Leading singular values of ΔW"],
      report.modules.map((m) => h("tr", {}, h("td", { class: "mono" }, m.module), h("td", {}, m.r),
        h("td", {}, m.effective_rank_90), h("td", {}, m.effective_rank_99),
        h("td", { title: m.note }, m.verdict.replaceAll("_", " ")), h("td", { class: "mono" }, shown(m.singular_values))))));
}

// A rank sweep's children (on the parent job, and in the version it published): the chosen one marked.
function rankSweepView(children, chosen) {
  return h("section", { id: "rank-sweep", "aria-label": "Rank sweep" },
    h("h3", {}, "Rank sweep"),
    table(["Rank", "Job", "Status", "Validation loss", "Steps", "Rank report", ""],
      children.map((c) => h("tr", { class: c.id === chosen ? "chosen" : null }, h("td", {}, c.rank),
        h("td", {}, h("a", { href: `#/jobs/${c.id}` }, c.id)), h("td", {}, c.status ? badge(c.status) : "—"),
        h("td", {}, c.val_loss === null || c.val_loss === undefined ? "—" : c.val_loss.toPrecision(4)),
        h("td", {}, dash(c.steps)), h("td", {}, c.rank_report ? c.rank_report.verdict.replaceAll("_", " ") : dash(c.error)),
        h("td", {}, c.id === chosen ? "chosen" : ""))),
      "Lowest validation loss wins; ties go to the smaller rank"));
}

function manifestView(m) {
  const kv = (obj, id) => h("dl", { class: "facts", id }, Object.entries(obj || {}).map(([k, v]) =>
    [h("dt", {}, k), h("dd", {}, typeof v === "object" && v !== null ? JSON.stringify(v) : String(v))]));
  return h("section", { id: "manifest", "aria-label": `Manifest of ${m.ref}` },
    h("h2", {}, `Manifest of ${m.ref}`),
    h("dl", { class: "facts" },
      h("dt", {}, "Base model"), h("dd", {}, dash(m.base_model)),
      h("dt", {}, "Source"), h("dd", {}, m.source),
      h("dt", {}, "Job"), h("dd", {}, m.job_id ? h("a", { href: `#/jobs/${m.job_id}` }, m.job_id) : "—"),
      h("dt", {}, "Continues"), h("dd", {}, dash(m.parent)),
      h("dt", {}, "Dataset"), h("dd", {}, m.dataset?.file_id ? `${m.dataset.file_id} (sha256 ${m.dataset.sha256})` : "—"),
      h("dt", {}, "Created"), h("dd", {}, time(m.created_at))),
    h("h3", {}, "LoRA config"), kv(m.lora_config, "lora-config"),
    h("h3", {}, "Hyperparameters"), kv(m.hyperparameters),
    h("h3", {}, "Final metrics"), kv(m.final_metrics),
    rankReportView(m.rank_report),
    m.rank_sweep ? rankSweepView(m.rank_sweep.children, m.rank_sweep.chosen.job_id) : null,
    h("h3", {}, "Files"),
    table(["File", "Size", "sha256"], (m.files || []).map((f) => h("tr", {},
      h("td", {}, f.path), h("td", {}, bytes(f.bytes ?? f.size)), h("td", { class: "mono" }, f.sha256)))));
}

async function adapterPage(name) {
  const detail = h("div");
  view().replaceChildren(h("p", {}, h("a", { href: "#/adapters" }, "← all adapters")), h("h1", {}, name), detail);
  try {
    const page = await api(`/v1/adapters/${name}/versions`);
    const manifestSlot = h("div");
    const showManifest = async (v) => {
      try { manifestSlot.replaceChildren(manifestView(await api(`/v1/adapters/${name}/versions/v${v}/manifest`))); }
      catch (e) { manifestSlot.replaceChildren(); showError(e, manifestSlot); }
    };
    detail.append(table(["Version", "Base model", "Source", "Job", "Size", "Created", ""],
      page.data.map((v) => h("tr", {}, h("td", {}, v.id), h("td", {}, dash(v.base_model)), h("td", {}, v.source),
        h("td", {}, v.job_id ? h("a", { href: `#/jobs/${v.job_id}` }, v.job_id) : "—"), h("td", {}, bytes(v.bytes)),
        h("td", {}, time(v.created_at)),
        h("td", {}, h("button", { type: "button", onclick: () => showManifest(v.version) }, "Manifest"), " ",
          h("button", { type: "button", onclick: () => download(name, v.version).catch((e) => showError(e, detail)) },
            "Download")))), "Versions"), manifestSlot);
    if (page.data.length) showManifest(page.data[0].version);
  } catch (e) { showError(e, detail); }
  return () => {};
}

// ------------------------------------------------------------------------------------------- admin
const limit = (v) => (v === null || v === undefined ? "no limit" : v);

async function tenantsPage() {
  const operator = sessionStorage.getItem(ROLE) === "operator";
  view().replaceChildren(h("h1", {}, "Tenants, keys and quotas"));
  try {
    const tenants = (await api("/v1/admin/tenants")).data;
    if (operator) {
      const [quotas, cluster] = await Promise.all([api("/v1/admin/quotas"), api("/v1/admin/cluster")]);
      const usage = Object.fromEntries(cluster.tenants.map((t) => [t.tenant_id, t]));
      const own = Object.fromEntries(quotas.data.map((q) => [q.tenant_id, q]));
      view().append(h("section", { id: "quotas", "aria-label": "Quotas and usage" }, h("h2", {}, "Quotas vs usage"),
        table(["Tenant", "GPUs running / nominal", "Borrowed / limit", "Running jobs / max", "Queued / max", "Max GPUs per job", "Weight"],
          tenants.map((t) => {
            const q = own[t.id] || quotas.default, u = usage[t.id] || {};
            return h("tr", { "data-tenant": t.id }, h("th", { scope: "row" }, t.name, own[t.id] ? "" : h("small", {}, " (default quota)")),
              h("td", {}, `${u.running_gpus ?? 0} / ${q.nominal_gpus}`), h("td", {}, `${u.borrowed_gpus ?? 0} / ${limit(q.borrowing_limit_gpus)}`),
              h("td", {}, `${u.running_jobs ?? 0} / ${limit(q.max_running_jobs)}`), h("td", {}, `${u.queued_jobs ?? 0} / ${limit(q.max_queued_jobs)}`),
              h("td", {}, limit(q.max_gpus_per_job)), h("td", {}, q.weight));
          }))));
    }
    const keys = h("section", { id: "keys", "aria-label": "API keys" }, h("h2", {}, "Keys"));
    view().append(keys);
    for (const t of tenants) {
      const page = await api(`/v1/admin/tenants/${t.id}/keys`);
      keys.append(table(["Key", "Hint", "Role", "Created", "State"], page.data.map((k) => h("tr", {},
        h("td", { class: "mono" }, k.id), h("td", { class: "mono" }, dash(k.hint)), h("td", {}, k.role), h("td", {}, time(k.created_at)),
        h("td", {}, k.revoked_at ? `revoked ${time(k.revoked_at)}` : "active"))), `${t.name} (${t.id})`));
    }
  } catch (e) { showError(e); }
  return () => {};
}

function clusterView(c) {
  const t = c.totals;
  return [
    h("dl", { class: "facts totals" },
      h("dt", {}, "GPUs"), h("dd", { id: "total-gpus" }, t.gpus ?? "not reported yet"),
      h("dt", {}, "Allocated"), h("dd", { id: "total-allocated" }, t.allocated),
      h("dt", {}, "Free"), h("dd", { id: "total-free" }, dash(t.free)),
      h("dt", {}, "Being preempted"), h("dd", {}, t.being_preempted)),
    h("section", { id: "nodes", "aria-label": "Nodes" }, h("h2", {}, "Nodes"),
      table(["Node", "Address", "GPUs", "Alive"], c.nodes.map((n) => h("tr", {}, h("td", { class: "mono" }, n.node_id),
        h("td", {}, dash(n.address)), h("td", {}, n.gpus), h("td", {}, n.alive ? "yes" : "no"))))),
    h("section", { id: "cluster-tenants", "aria-label": "Tenants on the cluster" }, h("h2", {}, "Who runs, borrows and waits"),
      table(["Tenant", "Running jobs", "GPUs (nominal)", "Borrowed", "Queued", "Share score", "Why its next job waits"],
        c.tenants.map((x) => h("tr", { "data-tenant": x.tenant_id }, h("th", { scope: "row" }, x.tenant_name || x.tenant_id),
          h("td", {}, x.running_jobs), h("td", {}, `${x.running_gpus} (${x.quota.nominal_gpus})`), h("td", {}, x.borrowed_gpus),
          h("td", {}, x.queued_jobs), h("td", {}, x.share_score.toFixed(2)), h("td", {}, dash(x.waiting_reason))))))];
}

async function clusterPage() {
  const body = h("div", { id: "cluster" });
  view().replaceChildren(h("h1", {}, "Cluster"), body);
  const load = async () => {
    try { body.replaceChildren(...clusterView(await api("/v1/admin/cluster"))); }
    catch (e) { body.replaceChildren(); showError(e, body); }
  };
  await load();
  return every(5000, load);
}

// ------------------------------------------------------------------------------------------- routing
async function route() {
  leave();
  leave = () => {};
  const signedIn = Boolean(sessionStorage.getItem(KEY));
  const role = sessionStorage.getItem(ROLE);
  $("#sign-in").hidden = signedIn;
  $("#nav").hidden = !signedIn;
  view().replaceChildren();
  if (!signedIn) { $("#api-key").focus(); return; }
  $("#who").textContent = role === "operator" ? "operator" : `tenant key (${role})`;
  for (const link of document.querySelectorAll("#nav a")) {
    const want = link.dataset.for;
    link.hidden = want === "operator" ? role !== "operator"
      : want === "admin" ? !(role === "operator" || role === "admin") : role === "operator";
  }
  const [path, query] = location.hash.replace(/^#/, "").split("?");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  const params = new URLSearchParams(query || "");
  const pages = {
    jobs: () => (parts[1] ? jobPage(parts[1]) : jobsPage(params)),
    adapters: () => (parts[1] ? adapterPage(parts[1]) : adaptersPage()),
    tenants: tenantsPage,
    cluster: clusterPage,
  };
  const page = pages[parts[0]] || (role === "operator" ? clusterPage : () => jobsPage(params));
  for (const link of document.querySelectorAll("#nav a")) {
    link.toggleAttribute("aria-current", link.getAttribute("href") === `#/${parts[0]}`);
  }
  const token = {};
  route.current = token;
  const stop = await page();
  if (route.current === token) leave = stop || (() => {});
  else if (stop) stop();
}

document.addEventListener("DOMContentLoaded", () => {
  $("#sign-in").addEventListener("submit", signIn);
  $("#sign-out").addEventListener("click", () => signOut());
  window.addEventListener("hashchange", route);
  route();
});
