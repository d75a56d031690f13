// The status page. Polls the paged API once a second; builds every element with textContent (never as
// markup), because store ids and URLs come from clients. A token (asked for on a 401) lives only in
// this tab's sessionStorage and goes out as "Authorization: Bearer".
"use strict";
const POLL_MS = 1000, JOBS_PER_PAGE = 20, RESULTS_PER_PAGE = 100, TOKEN_KEY = "retailpulse.token";
// The bar follows "images_processed", which the daemon moves about once a second while images finish (results
// are recorded a chunk at a time, "images_done"); the rate and the time left come from the polls of the last
// RATE_WINDOW_MS, once they span RATE_MIN_SPAN_MS, so that one poll's jitter does not make them jump.
const RATE_WINDOW_MS = 20000, RATE_MIN_SPAN_MS = 2000;
const view = { jobsOffset: 0, resultsOffset: 0, jobId: new URLSearchParams(location.search).get("job"),
               tokenRefused: false, statusEtag: null };
// A job's page waits for its status to change (Prefer: wait, If-None-Match) instead of asking every second.
const WAIT_S = 25;
const polls = new Map();  // job id -> [{atMs, done}], its polls of the last RATE_WINDOW_MS, oldest first

/** Text from clients with its invisible characters written as escapes (\u202e), as the CSV and the CLI show
 *  them (spool/vocabulary.py, visible): controls, format characters (bidi overrides, zero-width spaces) and
 *  line separators, which would hide or reorder the text around them. */
const INVISIBLE = /[\p{Cc}\p{Cf}\p{Zl}\p{Zp}]/gu;
function visible(text) {
  return String(text).replace(INVISIBLE, (ch) => {
    const code = ch.codePointAt(0);
    const [prefix, width] = code < 0x100 ? ["\\x", 2] : code < 0x10000 ? ["\\u", 4] : ["\\U", 8];
    return prefix + code.toString(16).padStart(width, "0");
  });
}

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = visible(text);
  if (cls) node.className = cls;
  return node;
}

/** A URL as text that wraps only at sensible points: after a "/" (not inside "//") and before "?", "&"
 *  or "#" (a <wbr> marks each), never inside a host name or a file name, not even at its hyphens (each
 *  part is unbreakable, unless it alone is longer than URL_PART_MAX: that one may break anywhere). */
const URL_PART_MAX = 40;
function urlText(url, cls = "url") {
  const span = el("span", null, cls);
  for (const part of String(url).split(/(?<=\/)(?!\/)|(?=[?&#])/)) {
    span.append(part.length > URL_PART_MAX ? document.createTextNode(visible(part)) : el("span", part, "url-part"),
                document.createElement("wbr"));
  }
  return span;
}

class Unauthorized extends Error {}
class Problem extends Error {}  // the API answered, with an error to show

/** GET a JSON document; throws Unauthorized on a 401, Problem on any other error answer. */
async function getJson(path, what, headers = {}) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const response = await fetch(path, { headers: token ? { ...headers, Authorization: "Bearer " + token } : headers });
  if (response.status === 401) throw new Unauthorized();
  if (response.status === 304) return { response, doc: null };  // unchanged: nothing to parse
  let doc;
  try {
    doc = await response.json();
  } catch (error) {
    throw new Problem(`${what}: the API answered ${response.status} without JSON`);
  }
  return { response, doc };
}

function showTokenForm() {
  const form = document.getElementById("token-form");
  document.getElementById("token-message").textContent = view.tokenRefused
    ? "That token was refused: the API does not know it. Check it and try again."
    : "This API needs a token:";
  form.classList.toggle("refused", view.tokenRefused);
  if (form.hidden) {
    form.hidden = false;
    document.getElementById("token").focus();
  }
}

function showProblem(text) {
  const p = document.getElementById("problem");
  p.hidden = !text;
  p.textContent = text || "";
}

/** {rate, secondsLeft} from a job's polls [{atMs, done}] (oldest first): images per second over the
 *  window, null until the polls span RATE_MIN_SPAN_MS and show progress. Pure, for the tests. */
function estimate(samples, total) {
  if (samples.length < 2) return { rate: null, secondsLeft: null };
  const first = samples[0], last = samples[samples.length - 1];
  const spanMs = last.atMs - first.atMs;
  if (spanMs < RATE_MIN_SPAN_MS || last.done <= first.done) return { rate: null, secondsLeft: null };
  const rate = (last.done - first.done) / (spanMs / 1000);
  return { rate, secondsLeft: total > last.done ? (total - last.done) / rate : null };
}

function remember(jobId, done, now) {
  const samples = (polls.get(jobId) || []).filter((s) => s.atMs >= now - RATE_WINDOW_MS);
  samples.push({ atMs: now, done });
  polls.set(jobId, samples);
  return samples;
}

/** "1 image", "3 images". */
function plural(count, word) {
  return `${count} ${count === 1 ? word : word + "s"}`;
}

function duration(seconds) {
  return seconds < 90 ? `${Math.ceil(seconds)} s` : `${Math.round(seconds / 60)} min`;
}

function progress(doc) {
  const total = doc.images_total || 0, recorded = doc.images_done || 0;
  const done = Math.max(doc.images_processed || 0, recorded);  // statuses of older daemons have no images_processed
  const percent = total ? Math.floor((100 * done) / total) : (doc.status === "ongoing" ? 0 : 100);
  let text = `${done} / ${total || "?"} images (${percent} %)`;
  if (done !== recorded) text += `, ${recorded} recorded`;
  if (doc.status === "ongoing") {
    const { rate, secondsLeft } = estimate(remember(doc.job_id, done, Date.now()), total);
    if (rate) text += `, ${rate.toFixed(1)} images/s`;
    if (secondsLeft) text += `, about ${duration(secondsLeft)} left`;
  } else {
    polls.delete(doc.job_id);
  }
  if (doc.images_cancelled) text += `; ${doc.images_cancelled} cancelled`;
  return { percent, text };
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
                  el("span", ` (${plural(failure.images_failed || 1, "image")}; first: `, "muted"),
                  urlText(failure.image_url || ""), el("span", ")", "muted"));
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
  if (callback.attempts) text += ` after ${plural(callback.attempts, "attempt")}`;
  if (callback.last_error) text += ` (last: ${callback.last_error})`;
  if (callback.next_attempt_at) text += `, next at ${callback.next_attempt_at}`;
  line.append(el("span", text + ": "), el("span", callback.url || "", "url"));
  return line;
}

async function refreshJobs() {
  const { response, doc: page } = await getJson(`/api/jobs?offset=${view.jobsOffset}&limit=${JOBS_PER_PAGE}`,
                                                "cannot list jobs");
  if (!response.ok) throw new Problem(page.error || `cannot list jobs (${response.status})`);
  document.getElementById("jobs").replaceChildren(...page.jobs.map(jobCard));
  const last = Math.min(page.offset + page.jobs.length, page.total);
  document.getElementById("jobs-range").textContent = `${page.total ? page.offset + 1 : 0}-${last} of ${page.total}`;
  document.getElementById("jobs-prev").disabled = page.offset === 0;
  document.getElementById("jobs-next").disabled = last >= page.total;
}

/** A table cell; ``label`` names its column where a narrow screen shows each row as a card (style.css). */
function cell(label, value, cls) {
  const td = el("td", value ?? "", cls);
  td.dataset.label = label;
  return td;
}

function urlCell(label, url) {
  const td = cell(label, null, "url");
  td.append(urlText(url));
  return td;
}

function resultRow(result) {
  const row = el("tr", null, result.error ? "failed" : "");
  row.append(cell("#", result.index, "nowrap"), cell("store", result.store_id, "nowrap"),
             cell("visit time", result.visit_time, "nowrap"), urlCell("URL", result.image_url),
             cell("width", result.width, "nowrap"), cell("height", result.height, "nowrap"),
             cell("perimeter", result.perimeter, "nowrap"), cell("error", result.error, "reason"));
  return row;
}

/** The job page when the API has no such job: say so, instead of empty tables. */
function showMissing(text) {
  document.getElementById("job-title").textContent = "Job " + view.jobId;
  const missing = document.getElementById("job-missing");
  missing.textContent = text;
  missing.hidden = !text;
  document.getElementById("job-details").hidden = Boolean(text);
}

/** The job's status and results; with ``waitS``, once its status differs from the one shown (or the wait is
 *  up: then nothing changes on the page). */
async function refreshJob(waitS = 0) {
  const id = encodeURIComponent(view.jobId);
  const waiting = waitS && view.statusEtag ? { Prefer: `wait=${waitS}`, "If-None-Match": view.statusEtag } : {};
  const { response: statusResponse, doc } = await getJson(`/api/status?jobid=${id}`, "cannot read the job", waiting);
  if (statusResponse.status === 304) return;
  view.statusEtag = statusResponse.ok ? statusResponse.headers.get("ETag") : null;
  if (statusResponse.status === 400) {  // {} for a job that does not exist (or is another token's)
    return showMissing(doc.error ? `No job “${view.jobId}”: ${doc.error}.`
      : `There is no job ${view.jobId}: it was never submitted, it was deleted, or it belongs to another token.`);
  }
  if (!statusResponse.ok) throw new Problem(doc.error || `cannot read the job (${statusResponse.status})`);
  showMissing("");
  document.getElementById("job-title").textContent = "Job " + doc.job_id;
  const summary = el("ol", null, "jobs");
  summary.append(jobCard(doc));
  document.getElementById("job-summary").replaceChildren(summary);
  const failures = (doc.error || []).map((f) => {
    const row = el("tr");
    row.append(cell("store", f.store_id, "nowrap"), cell("images failed", f.images_failed, "nowrap"),
               cell("first failure", f.error, "reason"), urlCell("URL", f.image_url || ""));
    return row;
  });
  document.querySelector("#failures tbody").replaceChildren(...failures);
  document.getElementById("failures-none").hidden = failures.length > 0;
  const { response, doc: page } = await getJson(
    `/api/results?jobid=${id}&offset=${view.resultsOffset}&limit=${RESULTS_PER_PAGE}`, "cannot read results");
  if (!response.ok) throw new Problem(page.error || `cannot read results (${response.status})`);
  document.querySelector("#results tbody").replaceChildren(...page.results.map(resultRow));
  const total = doc.images_total || 0;
  document.getElementById("results-range").textContent = resultsRange(view.resultsOffset, page.results.length, total);
  document.getElementById("results-prev").disabled = view.resultsOffset === 0;
  document.getElementById("results-next").disabled = view.resultsOffset + RESULTS_PER_PAGE >= total;
}

/** The pager's words for a page of results: the images it covers (by index, as the API pages them) and how
 *  many of them have a result yet. Pure, for the tests. */
function resultsRange(offset, shown, total) {
  if (!total) return "no images yet";
  const last = Math.min(offset + RESULTS_PER_PAGE, total) - 1;
  if (offset > last) return `no images here (the job has ${total})`;
  const covered = last - offset + 1;
  const recorded = shown === covered ? "" : shown ? ` (${shown} recorded so far)` : " (none recorded yet)";
  return `images ${offset}-${last} of ${total}${recorded}`;
}

async function downloadCsv() {
  // fetched here rather than followed as a link, so the token goes with it
  const token = sessionStorage.getItem(TOKEN_KEY);
  const response = await fetch(`/api/results.csv?jobid=${encodeURIComponent(view.jobId)}`,
                               { headers: token ? { Authorization: "Bearer " + token } : {} });
  if (!response.ok) return showProblem(`cannot download the CSV (${response.status})`);
  const url = URL.createObjectURL(await response.blob());
  const link = el("a");
  link.href = url;
  link.download = `job-${view.jobId}-results.csv`;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60000);
}

async function tick(waitS = 0) {
  if (!document.getElementById("token-form").hidden) return false;  // waiting for a token: nothing to ask yet
  try {
    await (view.jobId ? refreshJob(waitS) : refreshJobs());
    showProblem(null);  // the API answered: whatever was wrong before is over
    document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
    document.body.dataset.ready = "1";
    return true;
  } catch (error) {
    if (error instanceof Unauthorized) {
      if (sessionStorage.getItem(TOKEN_KEY)) {  // we sent one, and the API does not know it
        sessionStorage.removeItem(TOKEN_KEY);
        view.tokenRefused = true;
      }
      showProblem(null);
      showTokenForm();
    } else if (error instanceof Problem) {
      showProblem(error.message);
    } else {
      showProblem("the API cannot be reached: " + error.message);
    }
    return false;
  }
}

function start() {
  document.getElementById(view.jobId ? "jobs-view" : "job-view").hidden = true;
  document.getElementById(view.jobId ? "job-view" : "jobs-view").hidden = false;
  document.getElementById("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const token = document.getElementById("token").value.trim();
    if (!token) return;
    sessionStorage.setItem(TOKEN_KEY, token);
    document.getElementById("token").value = "";
    view.tokenRefused = false;
    document.getElementById("token-form").hidden = true;
    tick();
  });
  const step = (key, by) => () => { view[key] = Math.max(0, view[key] + by); tick(); };
  document.getElementById("jobs-prev").addEventListener("click", step("jobsOffset", -JOBS_PER_PAGE));
  document.getElementById("jobs-next").addEventListener("click", step("jobsOffset", JOBS_PER_PAGE));
  document.getElementById("results-prev").addEventListener("click", step("resultsOffset", -RESULTS_PER_PAGE));
  document.getElementById("results-next").addEventListener("click", step("resultsOffset", RESULTS_PER_PAGE));
  document.getElementById("csv").addEventListener("click", downloadCsv);
  if (view.jobId) {
    follow();
  } else {
    tick();
    setInterval(tick, POLL_MS);
  }
}

/** A job's page: ask again as soon as an answer comes (the API holds each until the status changes); after
 *  a problem, or with no token yet, wait POLL_MS first. */
async function follow() {
  for (;;) {
    const answered = await tick(WAIT_S);
    if (!answered) await new Promise((resolve) => setTimeout(resolve, POLL_MS));
  }
}

start();
