// The operators' dashboard: follows /ws/v1/runs (status feed) and /ws/v1/runs/{id} (a run's
// events) with the page's staff session, re-reads /dashboard/state for the counters and the runs
// waiting for a person, draws the charts of /dashboard/series as SVG, and cancels through
// /dashboard/runs/{id}/cancel. Plain JavaScript, no build step.
"use strict";

(() => {
  const NIL = "00000000-0000-0000-0000-000000000000";
  // A run goes queued -> running (-> input_required -> queued -> running ...) -> an end.
  const ENDED = new Set(["completed", "failed", "cancelled", "timed_out"]);
  const TERMINAL = new Set(["run.completed", "run.failed", "run.cancelled", "run.timed_out"]);
  const body = document.body;
  const maxRows = Number(body.dataset.maxRows);
  const csrfToken = document.querySelector("[name=csrfmiddlewaretoken]").value;
  const tbody = document.querySelector("#runs tbody");
  const wsBase = (location.protocol === "https:" ? "wss://" : "ws://") + location.host;
  const $ = (id) => document.getElementById(id);

  function say(text) {
    $("message").textContent = text;
  }

  // --- A WebSocket that reconnects with backoff (0.5 s doubling to 15 s, with jitter) ---------
  // url() is called on every attempt, so a run stream resumes with ?after= the last seq seen.
  function follow(url, { onOpen, onFrame, onEnd }) {
    let socket = null;
    let failures = 0;
    let stopped = false;
    let timer = null;
    function open() {
      socket = new WebSocket(url());
      socket.onopen = () => onOpen && onOpen();
      socket.onmessage = (message) => {
        failures = 0;
        onFrame(JSON.parse(message.data));
      };
      socket.onclose = (event) => {
        if (stopped) return;
        if (event.code === 1000 || event.code === 4401 || event.code === 4404) {
          stopped = true; // finished, logged out, or gone: reconnecting would not help
          if (onEnd) onEnd(event.code);
          return;
        }
        if (onEnd) onEnd(event.code, true);
        const delay = Math.min(15000, 500 * 2 ** failures) * (0.75 + Math.random() / 2);
        failures += 1;
        timer = setTimeout(open, delay);
      };
    }
    open();
    return {
      close() {
        stopped = true;
        clearTimeout(timer);
        if (socket) socket.close(1000);
      },
    };
  }

  // --- Rows -------------------------------------------------------------------------------
  function rowOf(runId) {
    return tbody.querySelector(`tr[data-run-id="${runId}"]`);
  }

  function newRow(run) {
    const row = document.createElement("tr");
    row.dataset.runId = run.run_id;
    row.dataset.createdAt = run.created_at;
    for (const col of ["id", "chain", "owner", "status", "agents", "tokens", "created", "action"]) {
      const td = document.createElement("td");
      td.dataset.col = col;
      row.append(td);
    }
    const link = document.createElement("a");
    link.href = body.dataset.adminUrl.replace(NIL, run.run_id);
    link.textContent = run.run_id.slice(0, 8);
    row.querySelector('[data-col="id"]').append(link);
    row.querySelector('[data-col="status"]').append(document.createElement("span"));
    const time = document.createElement("time");
    time.dateTime = run.created_at;
    time.textContent = run.created_at;
    row.querySelector('[data-col="created"]').append(time);
    // Newest first: before the first row created earlier than this one.
    const later = [...tbody.rows].find((r) => r.dataset.createdAt < run.created_at);
    tbody.insertBefore(row, later || null);
    while (tbody.rows.length > maxRows) tbody.lastElementChild.remove();
    return row;
  }

  // Applies what a feed frame or a state read knows about a run. An ended run stays ended, so an
  // answer read before its last frame arrived cannot take its row back (before its end, a run
  // may go back to queued: after a person's answer; the next state read is the truth).
  function show(run) {
    let row = rowOf(run.run_id);
    if (!row) {
      const oldest = tbody.lastElementChild;
      if (tbody.rows.length >= maxRows && oldest && oldest.dataset.createdAt > run.created_at) {
        return;
      }
      row = newRow(run);
    }
    const current = row.dataset.status;
    if (current && ENDED.has(current) && !ENDED.has(run.status)) return;
    row.dataset.status = run.status;
    const cell = (name) => row.querySelector(`[data-col="${name}"]`);
    cell("status").firstElementChild.textContent = run.status;
    cell("chain").textContent = `${run.chain} v${run.version}`;
    if (run.owner) cell("owner").textContent = run.owner;
    const p = run.progress;
    const agent = run.status === "running" && p.current_agent ? ` ${p.current_agent}` : "";
    cell("agents").textContent = `${p.agents_completed}/${p.agents_total}${agent}`;
    cell("tokens").textContent = run.usage.total_tokens;
    const action = cell("action");
    action.textContent = "";
    const waits = run.status === "queued" || run.status === "input_required";
    if (waits || (run.status === "running" && !run.cancel_requested)) {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "cancel";
      button.textContent = "Cancel";
      action.append(button);
    } else if (run.status === "running") {
      action.textContent = "stopping";
    }
  }

  // --- Counters and rows from /dashboard/state, at most once a second --------------------
  let lastRead = 0;
  let pending = null;
  async function readState() {
    pending = null;
    lastRead = Date.now();
    try {
      const response = await fetch(body.dataset.stateUrl, { redirect: "manual" });
      if (response.type === "opaqueredirect") return say("Logged out: reload the page to log in.");
      if (!response.ok) return say(`Could not read the counters (HTTP ${response.status}).`);
      const state = await response.json();
      $("count-active").textContent = state.counts.active;
      $("count-queued").textContent = state.counts.queued;
      $("count-waiting").textContent = state.counts.waiting;
      showWaiting(state.waiting);
      $("count-failed").textContent = state.counts.failed_last_hour;
      for (const run of state.runs.slice().reverse()) show(run);
    } catch (error) {
      say(`Could not read the counters: ${error.message}`);
    }
  }
  // The runs waiting for a person, redrawn whole from each state read (at most 50 rows).
  function showWaiting(runs) {
    const rows = document.querySelector("#waiting tbody");
    rows.textContent = "";
    if (!runs.length) {
      const row = rows.insertRow();
      row.className = "none";
      const cell = row.insertCell();
      cell.colSpan = 7;
      cell.textContent = "No run is waiting.";
      return;
    }
    for (const run of runs) {
      const row = rows.insertRow();
      row.dataset.runId = run.run_id;
      const link = document.createElement("a");
      link.href = body.dataset.answerUrl.replace(NIL, run.run_id);
      link.textContent = run.run_id.slice(0, 8);
      row.insertCell().append(link);
      row.insertCell().textContent = `${run.chain} v${run.version}`;
      row.insertCell().textContent = run.owner;
      const tool = run.tool ? ` of ${run.tool}` : "";
      row.insertCell().textContent = `${run.kind}${tool}${run.agent ? ` (${run.agent})` : ""}`;
      row.insertCell().textContent = run.prompt;
      for (const at of [run.requested_at, run.expires_at]) {
        const time = document.createElement("time");
        time.dateTime = at;
        time.textContent = at;
        row.insertCell().append(time);
      }
    }
  }

  function refresh() {
    if (pending) return;
    pending = setTimeout(readState, Math.max(0, lastRead + 1000 - Date.now()));
  }
  setInterval(refresh, 30000); // "failed in the last hour" also changes with no event at all

  // --- Charts from /dashboard/series: plain SVG, every 10 s and soon after a run ends -------
  const SVG = "http://www.w3.org/2000/svg";
  const WIDTH = 600;
  const HEIGHT = 150;
  const PAD = { left: 40, right: 8, top: 8, bottom: 18 };

  function svg(name, attrs, text) {
    const element = document.createElementNS(SVG, name);
    for (const [key, value] of Object.entries(attrs)) element.setAttribute(key, value);
    if (text !== undefined) element.textContent = text;
    return element;
  }

  const round = (n) => (Math.round(n * 10) / 10).toString();

  // lines: [{name, label, values, has}], one value a minute, oldest first (null: no data, drawn
  // as 0); has(value) says which values are points worth a dot. A line without one is left out.
  function drawChart(figure, lines, unit) {
    const n = lines[0].values.length;
    const top = Math.max(1, ...lines.flatMap((line) => line.values.map((v) => v || 0)));
    const x = (i) => PAD.left + (i * (WIDTH - PAD.left - PAD.right)) / Math.max(1, n - 1);
    const y = (v) => HEIGHT - PAD.bottom - ((v || 0) / top) * (HEIGHT - PAD.top - PAD.bottom);
    const chart = svg("svg", { viewBox: `0 0 ${WIDTH} ${HEIGHT}`, role: "img" });
    chart.append(
      svg("line", { class: "axis", x1: PAD.left, x2: WIDTH - PAD.right, y1: y(0), y2: y(0) }),
      svg("line", { class: "axis", x1: PAD.left, x2: PAD.left, y1: PAD.top, y2: y(0) }),
      svg("text", { x: PAD.left - 4, y: PAD.top + 8, "text-anchor": "end" }, round(top)),
      svg("text", { x: PAD.left - 4, y: y(0), "text-anchor": "end" }, "0"),
      svg("text", { x: PAD.left, y: HEIGHT - 4 }, `-${n - 1} min`),
      svg("text", { x: WIDTH - PAD.right, y: HEIGHT - 4, "text-anchor": "end" }, "now"),
    );
    const legend = figure.querySelector(".legend");
    legend.textContent = "";
    for (const line of lines) {
      const total = line.values.reduce((sum, v) => sum + (v || 0), 0);
      const item = document.createElement("li");
      item.className = `s-${line.name}`;
      item.textContent = line.label(total);
      legend.append(item);
      if (!line.values.some(line.has)) continue;
      const d = line.values.map((v, i) => `${i ? "L" : "M"}${round(x(i))},${round(y(v))}`);
      const path = svg("path", {
        class: `line s-${line.name}`,
        d: d.join(" "),
        "data-series": line.name,
        "data-points": n,
        "data-total": round(total),
      });
      path.append(svg("title", {}, line.label(total)));
      chart.append(path);
      line.values.forEach((v, i) => {
        if (!line.has(v)) return;
        const at = { class: `s-${line.name}`, cx: round(x(i)), cy: round(y(v)), r: 2 };
        const dot = svg("circle", at);
        dot.append(svg("title", {}, `${line.name}: ${round(v)} ${unit}, ${n - 1 - i} min ago`));
        chart.append(dot);
      });
    }
    figure.querySelector(".plot").replaceChildren(chart);
  }

  let seriesTimer = null;
  async function readSeries() {
    clearTimeout(seriesTimer);
    seriesTimer = setTimeout(readSeries, 10000);
    try {
      const response = await fetch(body.dataset.seriesUrl, { redirect: "manual" });
      if (!response.ok) return; // the counters' read says why
      const series = await response.json();
      const runs = Object.entries(series.runs).map(([name, values]) => ({
        name,
        values,
        label: (total) => `${name.replace("_", " ")} ${total}`,
        has: (v) => v > 0,
      }));
      drawChart($("chart-runs"), runs, "runs");
      const longest = Math.max(0, ...series.queue_wait_s.map((v) => v || 0));
      const label = () => `longest ${round(longest)} s`;
      const has = (v) => v !== null; // a minute with runs, even if none of them waited
      const wait = { name: "wait", values: series.queue_wait_s, label, has };
      drawChart($("chart-queue"), [wait], "s");
      $("queue-age").textContent = `${round(series.queue_age_s)} s`;
    } catch (error) {
      // drawn again on the next read
    }
  }
  let seriesSoon = null;
  function refreshSeries() {
    if (seriesSoon) return;
    seriesSoon = setTimeout(() => {
      seriesSoon = null;
      readSeries();
    }, 2000);
  }
  readSeries();

  // --- The status feed ------------------------------------------------------------------
  follow(() => `${wsBase}/ws/v1/runs`, {
    onOpen() {
      $("feed-state").dataset.state = "live";
      $("feed-state").textContent = "live";
      refresh(); // runs that started while the feed was down
    },
    onFrame(frame) {
      if (frame.event !== "run.status") return;
      show(frame.data);
      refresh();
      refreshSeries();
    },
    onEnd(code, retrying) {
      $("feed-state").dataset.state = "down";
      $("feed-state").textContent = retrying ? "reconnecting" : "disconnected";
      if (code === 4401) say("Logged out: reload the page to log in.");
    },
  });

  // --- One run's token stream -------------------------------------------------------------
  let watched = null;
  function watch(runId) {
    if (watched) watched.close();
    for (const row of tbody.querySelectorAll("tr.selected")) row.classList.remove("selected");
    const row = rowOf(runId);
    if (row) row.classList.add("selected");
    $("stream-run").textContent = runId;
    $("stream-state").textContent = "";
    $("agents").textContent = "";
    let after = 0;
    const agentText = (name) => {
      let block = $("agents").querySelector(`.agent[data-agent="${CSS.escape(name)}"]`);
      if (!block) {
        block = document.createElement("div");
        block.className = "agent";
        block.dataset.agent = name;
        const title = document.createElement("h3");
        title.textContent = name;
        block.append(title, document.createElement("pre"));
        $("agents").append(block);
      }
      return block.querySelector("pre");
    };
    watched = follow(() => `${wsBase}/ws/v1/runs/${runId}?after=${after}`, {
      onFrame(frame) {
        if (frame.seq <= after) return;
        after = frame.seq;
        if (frame.event === "agent.started") agentText(frame.data.agent);
        else if (frame.event === "agent.output") agentText(frame.data.agent).append(frame.data.chunk);
        else if (TERMINAL.has(frame.event)) $("stream-state").textContent = frame.event.slice(4);
      },
      onEnd(code, retrying) {
        if (retrying) $("stream-state").textContent = "reconnecting";
        else if (code === 4404) $("stream-state").textContent = "no such run";
      },
    });
  }

  // --- Cancel -----------------------------------------------------------------------------
  async function cancel(runId, button) {
    button.disabled = true;
    say("");
    try {
      const response = await fetch(body.dataset.cancelUrl.replace(NIL, runId), {
        method: "POST",
        headers: { "X-CSRFToken": csrfToken },
        redirect: "manual",
      });
      if (response.type === "opaqueredirect") return say("Logged out: reload the page to log in.");
      const answer = await response.json().catch(() => ({}));
      if (!response.ok) {
        button.disabled = false;
        return say(`Could not cancel ${runId.slice(0, 8)}: ${answer.detail || response.status}`);
      }
      const row = rowOf(runId);
      if (row) row.querySelector('[data-col="action"]').textContent = answer.status === "running" ? "stopping" : "";
      refresh();
    } catch (error) {
      button.disabled = false;
      say(`Could not cancel ${runId.slice(0, 8)}: ${error.message}`);
    }
  }

  tbody.addEventListener("click", (event) => {
    const row = event.target.closest("tr");
    if (!row || event.target.closest("a")) return;
    const button = event.target.closest("button.cancel");
    if (button) cancel(row.dataset.runId, button);
    else watch(row.dataset.runId);
  });
})();
