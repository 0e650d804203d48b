// clickpulse dashboard: polls the JSON panels of this server and renders them (uPlot for charts).
// No external requests: everything comes from this origin. Failures show in #status, never throw.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const state = { config: null, charts: {}, liveTimer: null, errors: 0 };

  function el(tag, attrs, text) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  function setStatus(text, isError) {
    const s = $("status");
    s.textContent = text;
    s.classList.toggle("error", !!isError);
  }

  async function getJSON(path) {
    const resp = await fetch(path, { cache: "no-store" });
    let body = null;
    try { body = await resp.json(); } catch (_) { body = null; }
    if (!resp.ok) throw new Error((body && body.error) || ("HTTP " + resp.status));
    return body;
  }

  const fmt = new Intl.NumberFormat();
  function cell(v) {
    if (typeof v === "number") return Number.isInteger(v) ? fmt.format(v) : v.toFixed(2);
    return v === null || v === undefined || v === "" ? "–" : String(v);
  }

  // a table from rows of objects; columns: [[key, label], ...]
  function renderTable(table, rows, columns) {
    table.replaceChildren();
    const head = el("tr");
    for (const [key, label] of columns) {
      head.appendChild(el("th", { class: numeric(rows, key) ? "num" : "" }, label));
    }
    table.appendChild(el("thead")).appendChild(head);
    const body = table.appendChild(el("tbody"));
    if (!rows.length) {
      const tr = body.appendChild(el("tr"));
      tr.appendChild(el("td", { colspan: String(columns.length), class: "empty" }, "no data"));
      return;
    }
    for (const row of rows) {
      const tr = body.appendChild(el("tr", { "data-testid": table.id + "-row" }));
      for (const [key] of columns) {
        tr.appendChild(el("td", { class: typeof row[key] === "number" ? "num" : "", "data-col": key }, cell(row[key])));
      }
    }
  }
  function numeric(rows, key) { return rows.length > 0 && typeof rows[0][key] === "number"; }

  function seconds(iso) { return Date.parse(iso.length === 10 ? iso + "T00:00:00Z" : iso) / 1000; }

  // a uPlot line chart in `holder`, kept and updated in place
  function renderChart(holder, xs, series) {
    const data = [xs, ...series.map((s) => s.values)];
    let chart = state.charts[holder.id];
    if (chart && chart.series.length !== series.length + 1) { chart.destroy(); chart = null; }
    if (!chart) {
      const colors = ["#2563eb", "#16a34a", "#ea580c", "#9333ea"];
      chart = new uPlot({
        width: Math.max(300, holder.clientWidth - 4),
        height: 220,
        series: [{}, ...series.map((s, i) => ({ label: s.label, stroke: colors[i % colors.length], width: 2 }))],
        scales: { x: { time: true } },
        axes: [{}, { size: 60 }],
      }, data, holder);
      state.charts[holder.id] = chart;
    } else {
      chart.setData(data);
    }
  }

  function time(iso) {
    const d = new Date(iso);
    return isNaN(d) ? "" : d.toISOString().slice(11, 19);
  }

  // ------------------------------------------------------------------------------------ live
  async function refreshLive() {
    const started = performance.now();
    const [visitors, epm, pages, events, actions] = await Promise.allSettled([
      getJSON("/api/live/active_visitors"),
      getJSON("/api/live/events_per_minute"),
      getJSON("/api/live/top_pages"),
      getJSON("/api/live/feed_events"),
      getJSON("/api/live/feed_actions"),
    ]);
    const failed = [visitors, epm, pages, events, actions].filter((r) => r.status === "rejected");
    if (visitors.status === "fulfilled") {
      const row = visitors.value.rows[0];
      $("live-visitors").textContent = cell(row ? row.visitors : 0);
    }
    if (epm.status === "fulfilled") {
      const rows = epm.value.rows;
      renderChart($("live-epm-chart"), rows.map((r) => seconds(r.minute)),
        [{ label: "events", values: rows.map((r) => r.events) }]);
    }
    if (pages.status === "fulfilled") {
      renderTable($("live-top-pages"), pages.value.rows,
        [["page_path", "page"], ["page_views", "views"], ["events", "events"]]);
    }
    if (events.status === "fulfilled") renderFeedEvents(events.value.rows);
    if (actions.status === "fulfilled") renderFeedActions(actions.value.rows);
    if (failed.length) {
      state.errors += 1;
      setStatus("live: " + failed[0].reason.message, true);
    } else {
      setStatus("live · updated " + new Date().toISOString().slice(11, 19) + " UTC · " +
        Math.round(performance.now() - started) + " ms", false);
    }
  }

  function renderFeedEvents(rows) {
    const list = $("live-feed-events");
    list.replaceChildren();
    for (const r of rows) {
      const li = list.appendChild(el("li", { "data-testid": "feed-event", "data-message-id": r.message_id }));
      li.appendChild(el("span", { class: "time" }, time(r.timestamp)));
      li.appendChild(el("span", { class: "name", "data-testid": "feed-event-name" }, r.name));
      li.appendChild(el("span", { class: "path", "data-testid": "feed-event-path" }, r.page_path));
      li.appendChild(el("span", { class: "user" }, [r.country, r.device_type].filter(Boolean).join(" · ")));
    }
    if (!rows.length) list.appendChild(el("li", { class: "empty" }, "no events yet"));
  }

  function renderFeedActions(rows) {
    const list = $("live-feed-actions");
    list.replaceChildren();
    for (const r of rows) {
      const li = list.appendChild(el("li", { "data-testid": "feed-action", "data-action-id": r.action_id }));
      li.appendChild(el("span", { class: "time" }, time(r.fired_at)));
      li.appendChild(el("span", { class: "name", "data-testid": "feed-action-rule" }, r.rule_id));
      li.appendChild(el("span", { class: r.status, "data-testid": "feed-action-status" }, r.status.replace("_", " ")));
      li.appendChild(el("span", { class: "user" }, r.user_key));
    }
    if (!rows.length) list.appendChild(el("li", { class: "empty" }, "no actions yet"));
  }

  function scheduleLive() {
    refreshLive().catch((e) => setStatus("live: " + e.message, true))
      .finally(() => { state.liveTimer = setTimeout(scheduleLive, state.config.refresh_ms); });
  }

  // ----------------------------------------------------------------------------------- history
  function rangeQuery() {
    return "from=" + encodeURIComponent($("history-from").value) + "&to=" + encodeURIComponent($("history-to").value);
  }

  async function loadPanel(name, render) {
    try {
      render((await getJSON("/api/history/" + name + "?" + rangeQuery())).rows);
    } catch (e) {
      setStatus(name + ": " + e.message, true);
    }
  }

  function refreshHistory() {
    loadPanel("active_users", (rows) => renderChart($("active-users-chart"), rows.map((r) => seconds(r.day)), [
      { label: "DAU", values: rows.map((r) => r.dau) },
      { label: "WAU", values: rows.map((r) => r.wau) },
      { label: "MAU", values: rows.map((r) => r.mau) },
    ]));
    loadPanel("sessions", (rows) => {
      renderChart($("sessions-chart"), rows.map((r) => seconds(r.day)), [{ label: "sessions", values: rows.map((r) => r.sessions) }]);
      renderTable($("sessions-table"), rows.map((r) => ({ ...r, bounce_rate: Math.round(r.bounce_rate * 1000) / 10 })),
        [["day", "day"], ["sessions", "sessions"], ["users", "users"], ["bounce_rate", "bounce %"], ["avg_duration_s", "avg duration s"]]);
    });
    loadPanel("top_pages", (rows) => renderTable($("top-pages"), rows, [["page_path", "page"], ["page_views", "views"], ["events", "events"]]));
    loadPanel("top_referrers", (rows) => renderTable($("top-referrers"), rows,
      [["referrer_host", "referrer"], ["referrer_type", "type"], ["page_views", "views"], ["visitors", "visitors"]]));
    loadPanel("top_campaigns", (rows) => renderTable($("top-campaigns"), rows,
      [["utm_campaign", "campaign"], ["utm_source", "source"], ["sessions", "sessions"], ["conversions", "conv."], ["revenue", "revenue"]]));
    loadPanel("top_countries", (rows) => renderTable($("top-countries"), rows, [["country", "country"], ["events", "events"]]));
    loadPanel("top_devices", (rows) => renderTable($("top-devices"), rows, [["device_type", "device"], ["events", "events"]]));
    loadPanel("retention", renderRetention);
    loadPanel("actions_per_rule", (rows) => renderTable($("actions-table"), rows,
      [["rule_id", "rule"], ["fired", "fired"], ["delivered", "delivered"], ["dead_lettered", "dead-lettered"]]));
    refreshFunnel();
  }

  function renderRetention(rows) {
    const weeks = Math.max(0, ...rows.map((r) => r.week_offset)) + 1;
    const byCohort = new Map();
    for (const r of rows) {
      if (!byCohort.has(r.cohort_week)) byCohort.set(r.cohort_week, { cohort_week: r.cohort_week, size: r.cohort_size });
      byCohort.get(r.cohort_week)["w" + r.week_offset] = r.retention_pct;
    }
    const columns = [["cohort_week", "cohort"], ["size", "users"]];
    for (let w = 0; w < weeks; w++) columns.push(["w" + w, "week " + w + " %"]);
    renderTable($("retention-table"), [...byCohort.values()], columns);
  }

  async function refreshFunnel() {
    const steps = $("funnel-steps").value;
    try {
      const body = await getJSON("/api/history/funnel?" + rangeQuery() + "&steps=" + encodeURIComponent(steps));
      const table = $("funnel-table");
      renderTable(table, body.rows, [["step", "#"], ["step_name", "step"], ["users", "users"], ["pct_of_first_step", "% of first"]]);
      table.querySelectorAll("tbody tr").forEach((tr, i) => {
        const row = body.rows[i];
        if (!row) return;
        const td = tr.appendChild(el("td"));
        const bar = td.appendChild(el("div", { class: "bar" }));
        bar.style.width = Math.max(1, Math.round((row.pct_of_first_step || 0) * 2)) + "px";
      });
    } catch (e) {
      setStatus("funnel: " + e.message, true);
    }
  }

  // -------------------------------------------------------------------------------------- start
  async function start() {
    try {
      state.config = await getJSON("/api/config");
    } catch (e) {
      setStatus("cannot load /api/config: " + e.message, true);
      return;
    }
    const today = new Date();
    const from = new Date(today.getTime() - state.config.default_range_days * 86400000);
    $("history-to").value = today.toISOString().slice(0, 10);
    $("history-from").value = from.toISOString().slice(0, 10);
    $("funnel-steps").value = state.config.funnel_steps.join(", ");
    $("range-form").addEventListener("submit", (ev) => { ev.preventDefault(); refreshHistory(); });
    $("funnel-form").addEventListener("submit", (ev) => { ev.preventDefault(); refreshFunnel(); });
    scheduleLive();
    refreshHistory();
  }

  document.addEventListener("DOMContentLoaded", start);
})();
