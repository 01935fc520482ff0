// The job page: stream text as it is generated (Server-Sent Events), fall back to polling,
// and offer Cancel and Copy. Plain JS, no build step.
(function () {
  "use strict";
  const root = document.getElementById("job");
  if (!root) return;
  const terminal = ["succeeded", "failed", "canceled"];
  const $ = (id) => document.getElementById(id);
  const maxTokens = parseInt(root.dataset.maxNewTokens || "0", 10);
  let text = $("output").textContent;
  let finished = terminal.includes(root.dataset.status);

  rememberJob(root.dataset.jobId, root.dataset.createdAt);

  function setStatus(status) {
    const el = $("status");
    el.textContent = status;
    el.className = "status status-" + status;
    root.dataset.status = status;
    $("cancel").hidden = terminal.includes(status);
  }

  function setTokens(n) {
    $("tokens").textContent = n;
    const bar = $("progress");
    if (maxTokens > 0) { bar.max = maxTokens; bar.value = Math.min(n, maxTokens); }
    else { bar.removeAttribute("value"); }
  }

  function showJob(job) {
    // Responses can arrive out of order (a cancel's answer after the stream's final event): never let
    // an older, unfinished view replace a finished one.
    if (finished && !terminal.includes(job.status)) return;
    setStatus(job.status);
    $("worker").textContent = job.worker || "—";
    if (job.output) {
      text = job.output.generated_text;
      $("output").textContent = text;
      setTokens(job.output.generated_tokens);
      if (job.output.finish_reason) {
        $("finish").textContent = job.output.generated_tokens + " tokens, finished: " + job.output.finish_reason;
      }
    }
    const m = job.metrics, parts = [];
    if (m.queue_seconds != null) parts.push("queued " + m.queue_seconds.toFixed(2) + " s");
    if (m.inference_seconds != null) parts.push("generated in " + m.inference_seconds.toFixed(2) + " s");
    if (m.seconds_per_token) parts.push((1 / m.seconds_per_token).toFixed(1) + " tokens/s");
    $("timings").textContent = parts.join(", ") || "—";
    if (job.error) {
      $("error").textContent = job.error.type + ": " + job.error.message;
      $("error").hidden = false;
    }
    finished = terminal.includes(job.status);
    if (finished) $("progress").value = $("progress").max;
  }

  function poll() {
    if (finished) return;
    fetch(root.dataset.apiUrl + "?wait=10", {headers: {"Accept": "application/json"}})
      .then((r) => (r.ok ? r.json() : null))
      .then((job) => { if (job) showJob(job); })
      .catch(() => {})
      .finally(() => { if (!finished) setTimeout(poll, 250); });
  }

  function stream() {
    // The stream replays from its start, so the text is rebuilt from its events.
    let attempt = 0;
    text = "";
    const source = new EventSource(root.dataset.eventsUrl);
    source.addEventListener("status", (e) => {
      const status = JSON.parse(e.data);
      if (status.attempt && status.attempt > attempt) {
        // The job (re)started: on another worker after a failure, the text starts over.
        attempt = status.attempt;
        text = "";
        $("output").textContent = "";
      }
      setStatus(status.status);
    });
    source.addEventListener("restart", (e) => {
      // The worker started this attempt's text over (after running out of memory, say).
      if (JSON.parse(e.data).attempt !== attempt) return;
      text = "";
      $("output").textContent = "";
    });
    source.addEventListener("token", (e) => {
      const token = JSON.parse(e.data);
      if (token.attempt !== undefined && token.attempt !== attempt) return;  // a replaced attempt
      text += token.text;
      $("output").textContent = text;
      setTokens(token.index);
    });
    source.addEventListener("done", (e) => { showJob(JSON.parse(e.data)); source.close(); });
    source.onerror = () => {
      // EventSource reconnects by itself (resuming with Last-Event-ID); once the job is final, stop.
      if (finished) source.close();
    };
  }

  if (!finished) {
    if ("EventSource" in window) stream(); else poll();
  }

  $("cancel").addEventListener("click", () => {
    $("cancel").disabled = true;
    const token = document.querySelector('meta[name="csrf-token"]');
    const headers = {"Accept": "application/json"};
    if (token) headers["X-CSRFToken"] = token.content;
    fetch(root.dataset.cancelUrl, {method: "POST", headers: headers, credentials: "same-origin"})
      .then((r) => r.json())
      .then((body) => { $("notice").textContent = body.message; if (body.job) showJob(body.job); })
      .catch(() => { $("notice").textContent = "could not reach the server"; })
      .finally(() => { $("cancel").disabled = false; });
  });

  $("copy").addEventListener("click", () => {
    const done = () => { $("notice").textContent = "copied"; };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(done, () => fallbackCopy(text, done));
    } else {
      fallbackCopy(text, done);
    }
  });

  function fallbackCopy(value, done) {
    const area = document.createElement("textarea");
    area.value = value;
    document.body.appendChild(area);
    area.select();
    try { document.execCommand("copy"); done(); } finally { area.remove(); }
  }

  function rememberJob(id, createdAt) {
    try {
      const list = JSON.parse(localStorage.getItem("bloomq.recent") || "[]").filter((j) => j.id !== id);
      list.unshift({id: id, created_at: createdAt, prompt: $("inputs").textContent.slice(0, 80)});
      localStorage.setItem("bloomq.recent", JSON.stringify(list.slice(0, 20)));
    } catch (e) { /* private mode: no recent list */ }
  }
})();
