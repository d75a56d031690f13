// The status page. Polls the paged API once a second; builds every element with textContent (never as
// markup), because store ids and URLs come from clients. A token (asked for on a 401) lives only in
// this tab's sessionStorage and goes out as "Authorization: Bearer".
"use strict";
const POLL_MS = 1000, JOBS_PER_PAGE = 20, RESULTS_PER_PAGE = 100, TOKEN_KEY = "retailpulse.token";
const view = { jobsOffset: 0, resultsOffset: 0, jobId: new URLSearchParams(location.search).get("job") };
const lastSeen = new Map();  // job id -> {done, atMs, ratePerS}: the rate comes from successive polls

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

class Unauthorized extends Error {}

async function api(path) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const response = await fetch(path, { headers: token ? { Authorization: "Bearer " + token } : {} });
  if (response.status === 401) throw new Unauthorized();
  return response;
}

function askForToken() {
  const form = document.getElementById("token-form");
  form.hidden = false;
  document.getElementById("token").focus();
}

function showProblem(text) {
  const p = document.getElementById("problem");
  p.hidden = !text;
  p.textContent = text || "";
}

function progress(doc) {
  const total = doc.images_total || 0, done = doc.images_done || 0, now = Date.now();
  const seen = lastSeen.get(doc.job_id);
  let rate = seen ? seen.ratePerS : null;
  if (seen && done > seen.done) rate = (done - seen.done) / ((now - seen.atMs) / 1000);
  if (!seen || done !== seen.done) lastSeen.set(doc.job_id, { done, atMs: now, ratePerS: rate });
  const percent = total ? Math.floor((100 * done) / total) : (doc.status === "ongoing" ? 0 : 100);
  let eta = "";
  if (doc.status === "ongoing" && rate && total > done) eta = `, about ${Math.ceil((total - done) / rate)} s left`;
  const speed = rate && doc.status === "ongoing" ? `, ${rate.toFixed(1)} images/s` : "";
  return { percent, text: `${done} / ${total || "?"} images (${percent} %)${speed}${eta}` };
}

function jobCard(doc) {
  const item = el("li", null, "job " + doc.status);
  item.dataset.jobId = doc.job_id;
  const head = el("div", null, "job-head");
  const link = el("a", "job " + doc.job_id);
  link.href = "/?job=" + encodeURIComponent(doc.job_id);
  head.append(link, el("span", doc.status, "state state-" + doc.status), el("span", doc.phase || "", "muted"));
  const p = progress(doc);
  const bar = el("div", null, "bar");
  const fill = el("div");
  fill.style.width = p.percent + "%";
  bar.append(fill);
  bar.setAttribute("role", "progressbar");
  bar.setAttribute("aria-valuenow", String(p.percent));
  item.append(head, bar, el("div", p.text, "progress muted"));
  if (doc.callback) item.append(webhookLine(doc.callback));
  if (Array.isArray(doc.error) && doc.error.length) {
    const list = el("ul", null, "failures");
    for (const failure of doc.error) {
      const line = el("li", null, "failure");
      line.append(el("b", failure.store_id, "store"), el("span", ": " + failure.error, "reason"),
                  el("span", ` (${failure.images_failed || 1} image(s); first: `, "muted"),
                  el("span", failure.image_url || "", "url"), el("span", ")", "muted"));
      list.append(line);
    }
    item.append(list);
  }
  return item;
}

// The completion webhook's delivery, as /api/status tells it ("callback"); the URL is the client's: text only.
function webhookLine(callback) {
  const line = el("div", null, "webhook webhook-" + callback.state);
  line.dataset.state = callback.state;
  let text = "webhook " + String(callback.state).replace("_", " ");
  if (callback.attempts) text += ` after ${callback.attempts} attempt(s)`;
  if (callback.last_error) text += ` (last: ${callback.last_error})`;
  if (callback.next_attempt_at) text += `, next at ${callback.next_attempt_at}`;
  line.append(el("span", text + ": "), el("span", callback.url || "", "url"));
  return line;
}

async function refreshJobs() {
  const response = await api(`/api/jobs?offset=${view.jobsOffset}&limit=${JOBS_PER_PAGE}`);
  const page = await response.json();
  if (!response.ok) return showProblem(page.error || "cannot list jobs");
  document.getElementById("jobs").replaceChildren(...page.jobs.map(jobCard));
  const last = Math.min(page.offset + page.jobs.length, page.total);
  document.getElementById("jobs-range").textContent = `${page.total ? page.offset + 1 : 0}-${last} of ${page.total}`;
  document.getElementById("jobs-prev").disabled = page.offset === 0;
  document.getElementById("jobs-next").disabled = last >= page.total;
}

function resultRow(result) {
  const row = el("tr", null, result.error ? "failed" : "");
  for (const value of [result.index, result.store_id, result.visit_time]) row.append(el("td", value));
  row.append(el("td", result.image_url, "url"));
  for (const value of [result.width, result.height, result.perimeter, result.error]) row.append(el("td", value ?? ""));
  return row;
}

async function refreshJob() {
  const id = encodeURIComponent(view.jobId);
  const statusResponse = await api(`/api/status?jobid=${id}`);
  const doc = await statusResponse.json();
  if (!statusResponse.ok) return showProblem(doc.error || `no job ${view.jobId}`);
  document.getElementById("job-title").textContent = "Job " + doc.job_id;
  const summary = el("ol", null, "jobs");
  summary.append(jobCard(doc));
  document.getElementById("job-summary").replaceChildren(summary);
  const failures = (doc.error || []).map((f) => {
    const row = el("tr");
    row.append(el("td", f.store_id), el("td", f.images_failed ?? ""), el("td", f.error), el("td", f.image_url || "", "url"));
    return row;
  });
  document.querySelector("#failures tbody").replaceChildren(...failures);
  const response = await api(`/api/results?jobid=${id}&offset=${view.resultsOffset}&limit=${RESULTS_PER_PAGE}`);
  const page = await response.json();
  if (!response.ok) return showProblem(page.error || "cannot read results");
  document.querySelector("#results tbody").replaceChildren(...page.results.map(resultRow));
  const total = doc.images_total || 0;
  document.getElementById("results-range").textContent =
    `images ${view.resultsOffset}-${view.resultsOffset + page.results.length - 1} of ${total}`;
  document.getElementById("results-prev").disabled = view.resultsOffset === 0;
  document.getElementById("results-next").disabled = view.resultsOffset + RESULTS_PER_PAGE >= total;
}

async function downloadCsv() {
  // fetched here rather than followed as a link, so the token goes with it
  const response = await api(`/api/results.csv?jobid=${encodeURIComponent(view.jobId)}`);
  if (!response.ok) return showProblem("cannot download the CSV");
  const url = URL.createObjectURL(await response.blob());
  const link = el("a");
  link.href = url;
  link.download = `job-${view.jobId}-results.csv`;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60000);
}

async function tick() {
  try {
    await (view.jobId ? refreshJob() : refreshJobs());
    document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
    document.body.dataset.ready = "1";
  } catch (error) {
    if (error instanceof Unauthorized) askForToken();
    else showProblem("the API cannot be reached: " + error.message);
  }
}

function start() {
  document.getElementById(view.jobId ? "jobs-view" : "job-view").hidden = true;
  document.getElementById(view.jobId ? "job-view" : "jobs-view").hidden = false;
  document.getElementById("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, document.getElementById("token").value.trim());
    document.getElementById("token-form").hidden = true;
    tick();
  });
  const step = (key, by) => () => { view[key] = Math.max(0, view[key] + by); tick(); };
  document.getElementById("jobs-prev").addEventListener("click", step("jobsOffset", -JOBS_PER_PAGE));
  document.getElementById("jobs-next").addEventListener("click", step("jobsOffset", JOBS_PER_PAGE));
  document.getElementById("results-prev").addEventListener("click", step("resultsOffset", -RESULTS_PER_PAGE));
  document.getElementById("results-next").addEventListener("click", step("resultsOffset", RESULTS_PER_PAGE));
  document.getElementById("csv").addEventListener("click", downloadCsv);
  tick();
  setInterval(tick, POLL_MS);
}

start();
