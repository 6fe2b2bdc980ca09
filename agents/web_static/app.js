/* mesh console: the pages (plans, a plan and its DAG, a task, submit, GPUs and hosts, alerts,
   dead letters, costs, agents), routed by the URL's #fragment. Live: one EventSource per page on
   the topics it shows (/api/events); each update changes the rows or nodes it names, never the
   whole page. Text from the mesh is set as text (textContent), never as HTML. */
"use strict";
(function () {
  const main = document.getElementById("main");
  const liveDot = document.getElementById("live");
  const TASK_STATES = ["pending", "waiting", "ready", "running", "escalating", "succeeded", "failed", "cancelled"];
  const PLAN_STATES = ["running", "succeeded", "failed", "cancelled", "rejected"];
  let role = "viewer";
  let source = null;
  let page = 0; // bumped on every route change: a late answer for an old page is dropped

  // ------------------------------------------------------------------ helpers
  function h(tag, attrs, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "text") e.textContent = v;
      else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else if (k === "class") e.className = v;
      else e.setAttribute(k, v === true ? "" : v);
    }
    for (const kid of kids.flat()) {
      if (kid === null || kid === undefined || kid === false) continue;
      e.appendChild(typeof kid === "string" || typeof kid === "number" ? document.createTextNode(String(kid)) : kid);
    }
    return e;
  }

  async function call(method, url, body) {
    const opts = { method, credentials: "same-origin", headers: {} };
    if (method !== "GET") {
      opts.headers["X-Mesh-Action"] = "1";
      opts.headers["Content-Type"] = "application/json";
      opts.body = JSON.stringify(body || {});
    }
    const r = await fetch(url, opts);
    if (r.status === 401) { location.href = "/login"; throw new Error("signed out"); }
    const type = r.headers.get("Content-Type") || "";
    const data = type.includes("json") ? await r.json() : { error: await r.text() };
    if (!r.ok && r.status !== 422) {
      const err = new Error(data.error || `${r.status} ${r.statusText}`);
      err.status = r.status;
      throw err;
    }
    return data;
  }
  const api = { get: (u) => call("GET", u), post: (u, b) => call("POST", u, b) };
  window.meshApi = api;

  function toast(text) {
    const t = document.getElementById("toast");
    t.textContent = text;
    t.hidden = false;
    clearTimeout(toast.timer);
    toast.timer = setTimeout(() => { t.hidden = true; }, 5000);
  }

  function throttle(fn, ms) {
    let timer = null, again = false;
    return function run() {
      if (timer) { again = true; return; }
      fn();
      timer = setTimeout(() => { timer = null; if (again) { again = false; run(); } }, ms);
    };
  }

  const ago = (s) => (s < 90 ? `${Math.round(s)}s` : s < 5400 ? `${Math.round(s / 60)}m` :
    s < 172800 ? `${Math.round(s / 3600)}h` : `${Math.round(s / 86400)}d`);
  const clock = (ts) => (ts ? new Date(ts * 1000).toLocaleString() : "");
  const secs = (s) => (s ? (s < 100 ? `${s.toFixed(1)}s` : ago(s)) : "");
  const st = (s) => h("span", { class: `st st-${s}`, text: s });
  const operator = () => role === "operator";
  const enc = encodeURIComponent;

  function progress(done, total) {
    const pct = total ? Math.round((100 * done) / total) : 0;
    return h("span", {}, h("span", { class: "progress" }, h("span", { style: `width:${pct}%` })), ` ${done}/${total}`);
  }

  function failed(err) {
    main.replaceChildren(h("p", { class: "err", text: String(err.message || err) }));
  }

  // ------------------------------------------------------------------ live updates
  // Each time the stream opens (and opens again after a break) the page reloads what it shows:
  // what changed before the server had the stream came in no update (`onHello`, else `onResync`).
  function listen(topics, onUpdate, onResync, onHello) {
    if (source) source.close();
    source = new EventSource(`/api/events?topics=${enc(topics.join(","))}`);
    source.addEventListener("hello", () => {
      liveDot.className = "live on";
      const again = onHello || onResync;
      if (again) again();
    });
    source.addEventListener("update", (e) => onUpdate(JSON.parse(e.data)));
    source.addEventListener("resync", () => { if (onResync) onResync(); });
    source.onerror = () => { liveDot.className = "live off"; };
  }

  // ------------------------------------------------------------------ plans
  async function plansPage(mine) {
    const state = { status: "", q: "", offset: 0, limit: 50 };
    const rows = new Map();
    const status = h("select", { "aria-label": "status" }, h("option", { value: "", text: "all states" }),
      PLAN_STATES.map((s) => h("option", { value: s, text: s })), h("option", { value: "final", text: "ended" }));
    const search = h("input", { type: "search", placeholder: "id or title", "aria-label": "search" });
    const body = h("tbody");
    const info = h("span", { class: "muted" });
    const prev = h("button", { type: "button", text: "‹ newer", onclick: () => { state.offset -= state.limit; load(); } });
    const next = h("button", { type: "button", text: "older ›", onclick: () => { state.offset += state.limit; load(); } });
    main.replaceChildren(h("h1", { text: "Plans" }), h("div", { class: "bar" }, status, search),
      h("div", { class: "table-wrap" }, h("table", {}, h("thead", {}, h("tr", {},
        ["plan", "title", "state", "progress", "age"].map((c, i) => h("th", { class: i === 1 ? "hide-sm" : null, text: c })))), body)),
      h("div", { class: "pager" }, prev, next, info));
    status.addEventListener("change", () => { state.status = status.value; state.offset = 0; load(); });
    search.addEventListener("input", throttle(() => { state.q = search.value; state.offset = 0; load(); }, 400));

    function row(p) {
      const tr = h("tr", { class: "click", "data-plan": p.id, onclick: () => { location.hash = `#/plan/${enc(p.id)}`; } },
        h("td", {}, h("a", { href: `#/plan/${enc(p.id)}`, text: p.id })), h("td", { class: "hide-sm", text: p.title }),
        h("td", {}, st(p.status)), h("td", {}, progress(p.done, p.total)), h("td", { text: ago(p.age_s) }));
      return tr;
    }
    async function load() {
      const q = `status=${enc(state.status)}&q=${enc(state.q)}&offset=${state.offset}&limit=${state.limit}`;
      const data = await api.get(`/api/plans?${q}`);
      if (mine !== page) return;
      rows.clear();
      body.replaceChildren(...data.plans.map((p) => { const tr = row(p); rows.set(p.id, tr); return tr; }));
      if (!data.plans.length) body.appendChild(h("tr", {}, h("td", { colspan: 5, class: "muted", text: "no plans" })));
      info.textContent = data.total ? `${state.offset + 1}–${state.offset + data.plans.length} of ${data.total}` : "";
      prev.disabled = state.offset <= 0;
      next.disabled = state.offset + state.limit >= data.total;
    }
    const reload = throttle(load, 1000);
    await load();
    listen(["plans"], (u) => {
      for (const [id, p] of Object.entries(u.changes)) {
        const old = rows.get(id);
        if (old && p && (!state.status || p.status === state.status || state.status === "final")) {
          const tr = row(p); old.replaceWith(tr); rows.set(id, tr);
        } else if (!old && state.offset === 0) reload();
        else if (old && !p) reload();
      }
    }, reload);
  }

  // ------------------------------------------------------------------ a plan
  // A plan's report (`mesh report`, mesh/report.py) as lines of text.
  function reportView(r) {
    const secs = (x) => (x >= 120 ? `${(x / 60).toFixed(1)} min` : `${x.toFixed(1)} s`);
    const lines = [];
    const outcomes = Object.entries(r.outcomes).map(([k, v]) => `${v} ${k}`).join(", ");
    lines.push(`${r.tasks} task(s): ${outcomes}; ${r.attempts} attempt(s) in ${secs(r.wall_s)}`);
    if (!r.complete) lines.push("(the history no longer holds the plan's start: figures count what is left)");
    if (r.critical_path.length) {
      lines.push(`critical path, ${secs(r.critical_path_s)}: ${r.critical_path.map((s) => `${s.task_id} (${secs(s.span_s)})`).join(" → ")}`);
    }
    if (r.slowest.length) lines.push("slowest: " + r.slowest.slice(0, 5).map((t) => `${t.task_id} ${secs(t.run_s)}`).join(", "));
    const reasons = Object.entries(r.retry_reasons).map(([k, v]) => `${v} ${k}`).join(", ");
    lines.push(`retries: ${r.retries}${reasons ? ` (${reasons})` : ""}; redeliveries: ${r.redeliveries}`);
    for (const n of r.retry_notes.slice(-5)) lines.push(`  ${n.task_id} attempt ${n.attempt}: ${n.reason}: ${n.error || "(no error text)"}`);
    if (r.escalations.length) lines.push(`escalations: ${r.escalations.length}, $${r.escalation_cost_usd.toFixed(4)}`);
    if (r.models.length) {
      lines.push(`GPU time ${secs(r.gpu_s)}, loading models ${secs(r.load_s)}: ` + r.models.map((m) => `${m.model} ${secs(m.gpu_s)}`).join(", "));
    }
    for (const g of r.failures) {
      lines.push(`failures (${g.cause}): ${g.tasks.slice(0, 8).join(", ")}${g.tasks.length > 8 ? "…" : ""}, ${g.final} for good`);
      for (const c of g.lines.slice(0, 3)) lines.push(`  ${c.count}× ${c.line}`);
    }
    return h("details", { open: "" }, h("summary", { text: "Report" }), h("pre", { class: "report", text: lines.join("\n") }));
  }

  async function planPage(mine, planId) {
    const head = h("div");
    const dagBox = h("div");
    const tbody = h("tbody");
    const info = h("span", { class: "muted" });
    const filter = h("select", { "aria-label": "task state" }, h("option", { value: "", text: "all tasks" }),
      TASK_STATES.map((s) => h("option", { value: s, text: s })));
    const t = { offset: 0, limit: 100, status: "" };
    const rows = new Map();
    const prev = h("button", { type: "button", text: "‹ prev", onclick: () => { t.offset -= t.limit; loadTasks(); } });
    const next = h("button", { type: "button", text: "next ›", onclick: () => { t.offset += t.limit; loadTasks(); } });
    const reportBox = h("div", { id: "report" });
    let reported = false;
    main.replaceChildren(head, reportBox, h("h2", { text: "DAG" }), dagBox, h("h2", { text: "Tasks" }), h("div", { class: "bar" }, filter),
      h("div", { class: "table-wrap" }, h("table", { id: "tasks" }, h("thead", {}, h("tr", {},
        ["task", "state", "attempt", "worker", "class"].map((c) => h("th", { text: c })))), tbody)),
      h("div", { class: "pager" }, prev, next, info));
    filter.addEventListener("change", () => { t.status = filter.value; t.offset = 0; loadTasks(); });
    const dag = new window.MeshDag(dagBox, planId, (task) => { location.hash = `#/plan/${enc(planId)}/task/${enc(task)}`; });

    function header(p) {
      const actions = h("div", { class: "bar" });
      if (operator() && p.status === "running") {
        actions.appendChild(h("button", { type: "button", class: "danger", id: "cancel", text: "Cancel plan", onclick: async () => {
          if (!confirm(`Cancel plan ${planId}?`)) return;
          try { await api.post(`/api/plans/${enc(planId)}/cancel`); toast("cancel sent"); } catch (e) { toast(e.message); }
        } }));
      }
      if (operator() && p.status !== "running" && p.status !== "succeeded" && p.status !== "rejected") {
        actions.appendChild(h("button", { type: "button", id: "retry", text: "Retry failed and cancelled", onclick: async () => {
          try { await api.post(`/api/plans/${enc(planId)}/retry`, { tasks: [] }); toast("retry sent"); } catch (e) { toast(e.message); }
        } }));
      }
      const counts = Object.entries(p.counts || {}).map(([k, v]) => h("span", {}, st(k), ` ${v} `));
      head.replaceChildren(h("h1", {}, `${p.title} `, h("span", { class: "muted", text: p.id })),
        h("div", { class: "bar", id: "plan-state" }, st(p.status), progress(p.done, p.total), ...counts,
          h("span", { class: "muted", text: `accepted ${clock(p.accepted_at)}` })),
        ...(p.error ? [h("p", { class: "err", text: p.error })] : []), actions);
      // once the plan has ended: what happened in it (`mesh report`), read from the history once
      if (!reported && p.finished_at) {
        reported = true;
        api.get(`/api/plans/${enc(planId)}/report`).then((d) => { if (mine === page) reportBox.replaceChildren(reportView(d.report)); },
          (e) => { reported = false; toast(`report: ${e.message}`); });
      }
    }
    function taskRow(r) {
      return h("tr", { class: "click", "data-task": r.id, onclick: () => { location.hash = `#/plan/${enc(planId)}/task/${enc(r.id)}`; } },
        h("td", {}, h("a", { href: `#/plan/${enc(planId)}/task/${enc(r.id)}`, text: r.id })), h("td", {}, st(r.status)),
        h("td", { text: r.attempt || "" }), h("td", { text: r.worker }), h("td", { text: r.class }));
    }
    async function loadTasks() {
      const data = await api.get(`/api/plans/${enc(planId)}/tasks?offset=${t.offset}&limit=${t.limit}&status=${enc(t.status)}`);
      if (mine !== page) return;
      rows.clear();
      tbody.replaceChildren(...data.tasks.map((r) => { const tr = taskRow(r); rows.set(r.id, { tr, r }); return tr; }));
      info.textContent = data.total ? `${t.offset + 1}–${t.offset + data.tasks.length} of ${data.total}` : "no tasks";
      prev.disabled = t.offset <= 0;
      next.disabled = t.offset + t.limit >= data.total;
    }
    async function loadAll() {
      let data;
      try {
        data = await api.get(`/api/plans/${enc(planId)}`);
      } catch (e) {
        if (e.status !== 404) throw e;
        // just submitted: the brain has not accepted it yet; its record's arrival reloads the page
        main.replaceChildren(h("p", { class: "muted", text: `waiting for the brain to accept ${planId}…` }));
        const again = () => { if (mine === page) route(); };
        listen(["plans"], (u) => { if (u.changes[planId]) again(); }, again,
          () => api.get(`/api/plans/${enc(planId)}`).then(again, () => {}));
        return false;
      }
      if (mine !== page) return false;
      header(data.plan);
      await Promise.all([dag.load(), loadTasks()]);
      return true;
    }
    // Updates that come while the tasks are read again wait until what was read is drawn: it may
    // have been read before them, and drawing it would undo them.
    let reading = 0;
    const held = [];
    async function holding(load) {
      reading++;
      try { await load(); } catch (e) { toast(e.message); } finally {
        reading--;
        if (!reading) held.splice(0).forEach(apply);
      }
    }
    const reloadHead = throttle(async () => { const d = await api.get(`/api/plans/${enc(planId)}`); if (mine === page) header(d.plan); }, 1000);
    const reloadAll = throttle(() => holding(loadAll), 2000);
    // the rows' workers and attempts (an update carries the status alone), from the server's memory
    const reloadRows = throttle(() => holding(loadTasks), 3000);
    if (!(await loadAll())) return;
    listen(["plans", `plan:${planId}`], (u) => { if (reading) held.push(u); else apply(u); }, reloadAll);
    function apply(u) {
      if (u.topic === "plans") {
        const p = u.changes[planId];
        if (p) header(p);
        return;
      }
      for (const [task, what] of Object.entries(u.changes)) {
        if (task === "reshaped") { reloadAll(); continue; }
        if (task === "plan") { reloadHead(); continue; }
        if (!TASK_STATES.includes(what)) continue;
        dag.update(task, what);
        const row = rows.get(task);
        if (row) {
          row.r = { ...row.r, status: what };
          const tr = taskRow(row.r); row.tr.replaceWith(tr); row.tr = tr;
          reloadRows();
        }
      }
    }
  }

  // ------------------------------------------------------------------ a task
  async function taskPage(mine, planId, taskId) {
    const base = `/api/plans/${enc(planId)}/tasks/${enc(taskId)}`;
    const out = h("div", { id: "output" });
    async function showOutput(sensitive) {
      const data = await api.get(`${base}/output${sensitive ? "?sensitive=1" : ""}`);
      if (data.error) { out.replaceChildren(h("p", { class: "muted", text: data.error })); return; }
      const kids = [h("p", { class: "muted", text: `attempt ${data.attempt}, ${data.status}${data.worker ? ` on ${data.worker}` : ""}` })];
      if (data.withheld) {
        kids.push(h("p", { text: "The output is withheld: the task is sensitive." }));
        if (operator()) kids.push(h("button", { type: "button", text: "Show the sensitive output", onclick: () => showOutput(true) }));
      } else {
        kids.push(h("pre", { id: "output-text", text: data.text || "(empty)" }));
        if (data.stderr) kids.push(h("h3", { text: "stderr (tail)" }), h("pre", { text: data.stderr }));
      }
      out.replaceChildren(...kids);
    }
    async function load() {
      const data = await api.get(base);
      if (mine !== page) return;
      const r = data.record;
      const kv = (pairs) => h("dl", { class: "kv" }, pairs.filter(([, v]) => v !== "" && v !== null && v !== undefined)
        .map(([k, v]) => [h("dt", { text: k }), h("dd", {}, v)]).flat());
      main.replaceChildren(
        h("p", {}, h("a", { href: `#/plan/${enc(planId)}`, text: `← ${planId}` })),
        h("h1", {}, `${taskId} `, st(r.status)),
        kv([["attempt", String(r.attempt)], ["worker", r.worker], ["class", r.spec.class || "cpu"], ["kind", r.spec.kind || "shell"],
          ["model", r.spec.model || ""], ["depends on", (r.spec.depends_on || []).join(", ")],
          ["released", clock(r.released_at)], ["started", clock(r.started_at)], ["finished", clock(r.finished_at)],
          ["duration", secs(r.duration_s)], ["exit code", r.rc === null ? "" : String(r.rc)], ["reason", r.reason],
          ["error", r.error ? h("span", { class: "err", text: r.error }) : ""], ["sensitive", r.spec.sensitive ? "yes" : ""]]),
        h("h2", { text: "Attempts" }),
        h("div", { class: "table-wrap" }, h("table", {}, h("thead", {}, h("tr", {}, ["#", "ended", "worker", "GPU", "took", "exit", "error"]
          .map((c) => h("th", { text: c })))), h("tbody", {}, data.outcomes.map((o) => h("tr", {},
          h("td", { text: o.attempt }), h("td", {}, st(o.status)), h("td", { text: o.worker }), h("td", { text: o.gpu }),
          h("td", { text: secs(o.duration_s) }), h("td", { text: o.rc === null ? "" : o.rc }), h("td", { class: "err", text: o.error })))))),
        h("h2", { text: "Output" }), out,
        h("h2", { text: "Logs (stderr, per attempt)" }),
        data.outcomes.filter((o) => o.stderr_tail).map((o) => [h("p", { class: "muted", text: `attempt ${o.attempt}` }), h("pre", { text: o.stderr_tail })]).flat(),
        h("h2", { text: "Events" }),
        h("div", { class: "table-wrap" }, h("table", { id: "events" }, h("thead", {}, h("tr", {}, ["time", "event", "detail"].map((c) => h("th", { text: c })))),
          h("tbody", {}, data.events.map((e) => h("tr", {}, h("td", { text: clock(e.at) }), h("td", { text: e.event.type }),
            h("td", { class: "muted", text: detail(e.event) })))))));
      out.replaceChildren(h("button", { type: "button", id: "show-output", text: "Show output", onclick: () => showOutput(false) }));
    }
    function detail(ev) {
      const bits = [];
      for (const k of ["attempt", "worker", "reason", "error", "duration_s", "rc"]) {
        const v = ev[k];
        if (v === undefined || v === "" || v === null) continue;
        bits.push(`${k}=${typeof v === "number" && !Number.isInteger(v) ? v.toFixed(3) : v}`);
      }
      return bits.join(" ");
    }
    await load();
    const reload = throttle(load, 1500);
    listen([`plan:${planId}`], (u) => { if (taskId in u.changes) reload(); }, reload);
  }

  // ------------------------------------------------------------------ submit
  async function submitPage(mine) {
    const text = h("textarea", { id: "plan-text", spellcheck: "false", "aria-label": "plan", placeholder: "# My plan\n\n## Tasks\n\n### hello\n\n```shell\necho hello\n```" });
    const file = h("input", { type: "file", accept: ".md,.markdown,.txt", "aria-label": "plan file" });
    const vars = h("div", { class: "vars", id: "vars" });
    const verdict = h("div", { id: "verdict" });
    const go = h("button", { type: "button", id: "submit", text: "Submit", disabled: !operator() });
    let name = "console.md";
    function addVar(k, v) {
      const row = [h("input", { placeholder: "NAME", value: k || "", class: "var-name" }), h("input", { placeholder: "value", value: v || "", class: "var-value" })];
      const del = h("button", { type: "button", text: "×", onclick: () => { row.forEach((e) => e.remove()); del.remove(); check(); } });
      row.forEach((e) => e.addEventListener("input", checkSoon));
      vars.append(...row, del);
    }
    function variables() {
      const out = {};
      const names = vars.querySelectorAll(".var-name"), values = vars.querySelectorAll(".var-value");
      names.forEach((n, i) => { if (n.value.trim()) out[n.value.trim()] = values[i].value; });
      return out;
    }
    function lineOf(n) {
      const lines = text.value.split("\n");
      let start = 0;
      for (let i = 0; i < n - 1 && i < lines.length; i++) start += lines[i].length + 1;
      text.focus();
      text.setSelectionRange(start, start + (lines[n - 1] || "").length);
    }
    async function check() {
      if (!text.value.trim()) { verdict.replaceChildren(); return null; }
      const data = await api.post("/api/validate", { text: text.value, variables: variables(), name });
      if (mine !== page) return null;
      if (data.ok) {
        verdict.replaceChildren(h("p", {}, "✓ ", h("b", { text: data.title }), `: ${data.tasks} task${data.tasks === 1 ? "" : "s"}`));
        const have = variables();
        for (const [k, v] of Object.entries(data.variables || {})) if (!(k in have)) addVar(k, v);
      } else {
        verdict.replaceChildren(h("p", { class: "err", text: `${data.problems.length} problem(s); nothing can be submitted yet` }),
          h("ul", { class: "problems" }, data.problems.map((p) => h("li", {},
            h("a", { href: "#/submit", class: "line", text: p.line ? `line ${p.line}` : "plan", onclick: (e) => { e.preventDefault(); if (p.line) lineOf(p.line); } }),
            `: ${p.message}`, p.hint ? h("div", { class: "muted", text: p.hint }) : null))));
      }
      return data;
    }
    const checkSoon = throttle(() => { check().catch((e) => toast(e.message)); }, 700);
    text.addEventListener("input", checkSoon);
    file.addEventListener("change", async () => {
      const f = file.files[0];
      if (!f) return;
      name = f.name;
      text.value = await f.text();
      check();
    });
    go.addEventListener("click", async () => {
      go.disabled = true;
      try {
        const data = await api.post("/api/submit", { text: text.value, variables: variables(), name });
        if (data.ok) { toast(`submitted ${data.plan}`); location.hash = `#/plan/${enc(data.plan)}`; return; }
        await check();
      } catch (e) { toast(e.message); } finally { go.disabled = !operator(); }
    });
    main.replaceChildren(h("h1", { text: "Submit a plan" }),
      h("div", { class: "bar" }, h("label", {}, "Upload ", file), h("button", { type: "button", text: "+ variable", onclick: () => addVar() }),
        h("button", { type: "button", id: "validate", text: "Check", onclick: () => check() }), go,
        operator() ? null : h("span", { class: "muted", text: "(a read-only token cannot submit)" })),
      vars, text, verdict);
    listen(["plans"], () => {});
  }

  // ------------------------------------------------------------------ GPUs and hosts
  async function gpusPage(mine) {
    const charts = new Map(); // telemetry key -> {points, draw}
    const gpuBox = h("div", { class: "cards", id: "gpus" });
    const hostBox = h("div", { class: "cards", id: "hosts" });
    main.replaceChildren(h("h1", { text: "GPUs" }), gpuBox, h("h1", { text: "Hosts" }), hostBox);
    const num = (v, unit) => (v === null || v === undefined ? "–" : `${Math.round(v)}${unit}`);
    function chart(key, points, series) {
      const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
      svg.setAttribute("class", "chart");
      const c = { points: points.slice(-360), draw: () => window.meshCharts.line(svg, c.points, series) };
      charts.set(key, c);
      c.draw();
      return svg;
    }
    async function control(gpu, action) {
      const reason = action === "cordon" || action === "pause" ? (prompt(`Why ${action} ${gpu}?`) || "") : "";
      try { await api.post(`/api/gpus/${enc(gpu)}/control`, { action, reason }); toast(`${action} sent to ${gpu}`); } catch (e) { toast(e.message); }
    }
    async function load() {
      const data = await api.get("/api/gpus");
      if (mine !== page) return;
      charts.clear();
      gpuBox.replaceChildren(...data.gpus.map((g) => {
        const s = g.sample || {}, state = g.state || {};
        const model = state.llm || (state.script_models || []).join(", ") || "";
        return h("div", { class: "card", "data-gpu": g.gpu },
          h("h3", {}, h("span", { text: g.gpu }), st(state.state || "unowned")),
          h("dl", { class: "kv" }, h("dt", { text: "card" }), h("dd", { text: s.name || state.name || "" }),
            h("dt", { text: "model" }), h("dd", { text: model || "none loaded" }),
            h("dt", { text: "temperature" }), h("dd", { text: num(s.temp_c, " °C") }),
            h("dt", { text: "utilisation" }), h("dd", { text: num(s.util_pct, "%") }),
            h("dt", { text: "memory" }), h("dd", { text: s.mem_total_mb ? `${num(s.mem_used_mb, "")} / ${num(s.mem_total_mb, " MB")}` : "–" }),
            h("dt", { text: "power" }), h("dd", { text: `${num(s.power_w, " W")}${s.power_limit_w ? ` of ${num(s.power_limit_w, " W")}` : ""}` }),
            state.hold ? h("dt", { text: "held" }) : null, state.hold ? h("dd", { text: state.hold }) : null),
          s.key ? chart(s.key, g.chart, [{ key: "temp", cls: "l1", label: "°C", max: 100 }, { key: "util", cls: "l2", label: "util", unit: "%", max: 100 }]) : null,
          s.key ? chart(`${s.key}#p`, g.chart, [{ key: "power", cls: "l1", label: "W" }, { key: "mem", cls: "l2", label: "MB" }]) : null,
          operator() && g.state ? h("div", { class: "bar" }, ["pause", "resume", "cordon", "uncordon"].map((a) =>
            h("button", { type: "button", "data-action": a, text: a, onclick: () => control(g.gpu, a) }))) : null);
      }));
      if (!data.gpus.length) gpuBox.appendChild(h("p", { class: "muted", text: "no GPUs: no GPU worker or watchdog has reported one" }));
      hostBox.replaceChildren(...data.hosts.map((s) => h("div", { class: "card", "data-host": s.host },
        h("h3", {}, h("span", { text: s.host })),
        h("dl", { class: "kv" }, h("dt", { text: "CPU" }), h("dd", { text: `${num(s.cpu_pct, "%")} (load ${s.load1.toFixed(2)})` }),
          h("dt", { text: "RAM" }), h("dd", { text: `${num(s.ram_used_mb, "")} / ${num(s.ram_total_mb, " MB")}` }),
          h("dt", { text: "disk free" }), h("dd", { text: `${num(s.disk_free_pct, "%")} of ${num(s.disk_total_mb / 1024, " GB")}` })),
        chart(s.key, s.chart, [{ key: "cpu", cls: "l1", label: "CPU", unit: "%", max: 100 }, { key: "disk_free", cls: "l2", label: "disk free", unit: "%", max: 100 }]))));
      if (!data.hosts.length) hostBox.appendChild(h("p", { class: "muted", text: "no host telemetry: no watchdog is running" }));
    }
    await load();
    const reload = throttle(load, 1500);
    listen(["gpus", "telemetry"], (u) => {
      if (u.topic === "gpus") { reload(); return; }
      for (const [key, point] of Object.entries(u.changes)) {
        for (const k of [key, `${key}#p`]) {
          const c = charts.get(k);
          if (!c) { if (k === key) reload(); continue; }
          c.points.push(point);
          if (c.points.length > 360) c.points.shift();
          c.draw();
        }
      }
    }, reload);
  }

  // ------------------------------------------------------------------ alerts, dead letters, costs, agents
  function table(cols, rows) {
    return h("div", { class: "table-wrap" }, h("table", {}, h("thead", {}, h("tr", {}, cols.map((c) => h("th", { text: c })))),
      h("tbody", {}, rows.length ? rows.map((r) => h("tr", {}, r.map((c) => h("td", {}, c)))) : h("tr", {}, h("td", { colspan: cols.length, class: "muted", text: "none" })))));
  }
  function simplePage(mine, title, topic, url, render) {
    const box = h("div");
    main.replaceChildren(h("h1", { text: title }), box);
    async function load() {
      const data = await api.get(url());
      if (mine === page) box.replaceChildren(render(data, load));
    }
    const reload = throttle(load, 2000);
    listen([topic], reload, reload);
    return load();
  }
  const alertsPage = (mine) => simplePage(mine, "Alerts", "alerts", () => "/api/alerts", (d) => table(
    ["", "rule", "target", "host", "severity", "value", "since", "message"],
    d.alerts.map((a) => [st(a.firing ? "firing" : "resolved"), a.rule, a.target, a.host, a.severity,
      a.metric ? `${a.metric} ${a.value} (≥ ${a.threshold})` : "", clock(a.at), a.message])));
  const deadPage = (mine) => simplePage(mine, "Dead letters", "dead", () => "/api/dead", (d) => h("div", {},
    h("p", { class: "muted", text: `${d.total} dead letter(s); the newest ${d.dead.length} shown` }),
    table(["time", "agent", "subject", "reason", "size"], d.dead.map((x) => [clock(x.at), x.agent_id, x.subject, x.reason, String(x.size)]))));
  function costsPage(mine) {
    let by = "day";
    return simplePage(mine, "Costs", "costs", () => `/api/costs?by=${by}`, (d, load) => {
      const sel = h("select", { "aria-label": "group by" }, h("option", { value: "day", text: "by day (UTC)" }), h("option", { value: "plan", text: "by plan" }));
      sel.value = by;
      sel.addEventListener("change", () => { by = sel.value; load(); });
      const total = d.rows.reduce((s, r) => s + r.usd, 0);
      return h("div", {}, h("div", { class: "bar" }, sel, h("span", { class: "muted", text: `total $${total.toFixed(4)}` })),
        table([by, "answered", "failed", "tokens in", "tokens out", "USD"], d.rows.map((r) =>
          [r.key, String(r.answered), String(r.failed), String(r.tokens_in), String(r.tokens_out), `$${r.usd.toFixed(4)}`])));
    });
  }
  const agentsPage = (mine) => simplePage(mine, "Agents", "agents", () => "/api/agents", (d) => table(
    ["agent", "role", "host", "state", "classes", "slots", "running", "up", "seen"],
    d.agents.map((a) => [a.agent_id, a.role, a.host, st(a.state), (a.classes || []).join(","), String(a.slots),
      String((a.running || []).length), ago(a.up_s), `${ago(a.seen_s)} ago`])));

  // ------------------------------------------------------------------ routing
  async function route() {
    page += 1;
    const mine = page;
    const parts = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
    const name = parts[0] || "plans";
    document.querySelectorAll("nav a").forEach((a) => a.classList.toggle("on", a.dataset.page === name || (name === "plan" && a.dataset.page === "plans")));
    document.getElementById("nav").classList.remove("open");
    main.replaceChildren(h("p", { class: "muted", text: "loading…" }));
    try {
      if (name === "plan" && parts[2] === "task") await taskPage(mine, parts[1], parts[3]);
      else if (name === "plan") await planPage(mine, parts[1]);
      else if (name === "submit") await submitPage(mine);
      else if (name === "gpus") await gpusPage(mine);
      else if (name === "alerts") await alertsPage(mine);
      else if (name === "dead") await deadPage(mine);
      else if (name === "costs") await costsPage(mine);
      else if (name === "agents") await agentsPage(mine);
      else await plansPage(mine);
    } catch (e) { if (mine === page) failed(e); }
  }

  // ------------------------------------------------------------------ the operator's chat (hook)
  // The chat panel (index.html, #chat) is shown once a handler is attached:
  //   meshChat.attach(async (question, say) => { ...; say(chunk) ... })
  // `say` appends streamed text to the answer. Nothing attaches one yet.
  window.meshChat = {
    attach(handler) {
      const panel = document.getElementById("chat"), log = document.getElementById("chat-log");
      const form = document.getElementById("chat-form"), input = document.getElementById("chat-input");
      panel.hidden = false;
      form.addEventListener("submit", async (e) => {
        e.preventDefault();
        const q = input.value.trim();
        if (!q) return;
        input.value = "";
        log.appendChild(h("p", {}, h("b", { text: "you: " }), q));
        const answer = h("pre");
        log.appendChild(answer);
        try { await handler(q, (chunk) => { answer.textContent += chunk; }); } catch (err) { answer.textContent += `\n(${err.message})`; }
      });
    },
  };

  document.getElementById("menu").addEventListener("click", () => document.getElementById("nav").classList.toggle("open"));
  window.addEventListener("hashchange", route);
  api.get("/api/me").then((me) => {
    role = me.role;
    document.getElementById("role").textContent = role;
    const out = document.getElementById("signout");
    out.hidden = !me.signed_in;
    out.addEventListener("click", () => api.post("/logout").finally(() => { location.href = "/login"; }));
    route();
  }).catch(failed);
})();
