// walrelay's dashboard. The process keeps an hour of samples (one a
// second); this page loads all of it at once (api/history), then asks
// each second for what is new, and for the current values (api/status).
// One page serves the three processes: VIEWS says what each one shows.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const root = getComputedStyle(document.documentElement);
  const colour = (name) => root.getPropertyValue("--" + name).trim();
  const C = {
    blue: colour("blue"), orange: colour("orange"), red: colour("red"), green: colour("green"),
    purple: colour("purple"), grey: colour("grey"), amber: colour("amber"),
    muted: colour("muted"), line: colour("line"), text: colour("text"),
  };
  const PARTITION_COLOURS = [C.blue, C.orange, C.green, C.purple, C.amber, C.red, "#79c0ff", "#ffa198", "#56d364", "#e3b341"];

  // ---- numbers for people -------------------------------------------------
  const NF = new Intl.NumberFormat("en-US");
  // Between a number and its unit: they stay on one line.
  const NBSP = "\u00a0";
  const missing = (v) => v === null || v === undefined || Number.isNaN(v);
  const num = (v) => (missing(v) ? "–" : NF.format(Math.round(v)));
  // "1 row", "2 rows", "– rows".
  const count = (v, word) => num(v) + " " + word + (v === 1 ? "" : "s");
  function bytes(v) {
    if (missing(v)) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let x = Math.abs(v), i = 0;
    // 1023.9 MiB reads 1 GiB, not 1024 MiB.
    while (x >= 1023.5 && i < units.length - 1) { x /= 1024; i++; }
    const digits = i === 0 || x >= 100 || Number.isInteger(x) ? 0 : x >= 10 ? 1 : 2;
    return (v < 0 ? "-" : "") + Number(x.toFixed(digits)) + NBSP + units[i];
  }
  function ms(v) {
    if (missing(v)) return "–";
    if (v >= 1000) return seconds(v / 1000);
    return (v >= 100 ? Math.round(v) : Number(v.toPrecision(2))) + NBSP + "ms";
  }
  // A latency axis' tick: 1 ms … 100 ms, 1 s, 10 s, 100 s.
  const msTick = (v) => (v < 1000 ? ms(v) : NF.format(v / 1000) + NBSP + "s");
  function seconds(v) {
    if (missing(v)) return "–";
    if (v < 60) return Number(v.toFixed(v < 10 ? 1 : 0)) + NBSP + "s";
    if (v < 3600) return Number((v / 60).toFixed(1)) + NBSP + "min";
    if (v < 86400) return Number((v / 3600).toFixed(1)) + NBSP + "h";
    return Number((v / 86400).toFixed(1)) + NBSP + "d";
  }
  function rate(v) {
    if (missing(v)) return "–";
    if (v === 0) return "0";
    if (v < 10) return String(Number(v.toFixed(1)));
    return NF.format(Math.round(v));
  }
  const percent = (v) => (missing(v) ? "–" : (v < 1 && v > 0 ? v.toFixed(2) : v < 10 ? v.toFixed(1) : Math.round(v)) + "%");
  const pad = (n) => String(n).padStart(2, "0");
  function clock(unixMs, withSeconds = true) {
    const d = new Date(unixMs);
    return pad(d.getHours()) + ":" + pad(d.getMinutes()) + (withSeconds ? ":" + pad(d.getSeconds()) : "");
  }
  const ago = (unixMs) => seconds(Math.max(0, (serverNow() - unixMs) / 1000));

  // Text that wraps only between words: each word in a span that does not
  // wrap inside (a hyphen or a slash is not a place to break a value).
  // A long dotted name (a topic, a table) may break after a dot, as
  // addresses do, and nowhere else.
  function words(el, text) {
    const parts = String(text).split(/[ \t\n]+/).filter((w) => w.length > 0);
    const nodes = [];
    parts.forEach((w, i) => {
      if (i > 0) nodes.push(document.createTextNode(" "));
      const pieces = w.length > 20 ? w.split(/(?<=\.)(?=.)/) : [w];
      pieces.forEach((piece, j) => {
        if (j > 0) nodes.push(document.createElement("wbr"));
        const span = document.createElement("span");
        span.className = "w";
        span.textContent = piece;
        nodes.push(span);
      });
    });
    el.replaceChildren(...nodes);
  }
  function el(tag, className, text) {
    const e = document.createElement(tag);
    if (className) e.className = className;
    if (text !== undefined) words(e, text);
    return e;
  }

  // ---- axes: ticks people read -------------------------------------------
  const decimal = [];
  for (let e = -2; e <= 12; e++) for (const m of [1, 2, 5]) decimal.push(Number((m * 10 ** e).toPrecision(1)));
  const integers = decimal.filter((v) => v >= 1);
  const binary = [];
  for (let e = 0; e <= 60; e++) binary.push(2 ** e);
  const durations = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 14400, 43200, 86400];
  // kind -> [tick increments, tick label, smallest top of the axis]
  const AXES = {
    bytes: [binary, bytes, 1024],
    count: [integers, num, 4],
    rate: [decimal, rate, 1],
    ms: [decimal, msTick, 1],
    seconds: [durations, seconds, 5],
    percent: [[1, 2, 5, 10, 20, 25, 50], (v) => v + "%", 100],
  };

  function axisSize(self, values, axisIdx, cycleNum) {
    const axis = self.axes[axisIdx];
    if (cycleNum > 1) return axis._size;
    let size = axis.ticks.size + axis.gap;
    const longest = (values || []).reduce((a, v) => (v && v.length > a.length ? v : a), "");
    if (longest) {
      self.ctx.font = axis.font[0];
      size += self.ctx.measureText(longest).width / devicePixelRatio;
    }
    return Math.ceil(size) + 4;
  }

  // ---- what each process shows -------------------------------------------
  // A series: label, colour, the Prometheus metric behind it (the tests
  // check it against /metrics and dashboards/walrelay.json), and its
  // values from the history columns (H).
  const col = (name) => (H) => H.columns[name] || [];
  const perSecond = (name) => (H) => {
    const t = H.columns.t, v = H.columns[name] || [];
    return v.map((x, i) => {
      if (missing(x)) return null;
      const dt = i > 0 ? (t[i] - t[i - 1]) / 1000 : H.interval_ms / 1000;
      return dt > 0 ? x / Math.max(dt, 0.5) : null;
    });
  };
  const LATENCY = (what, metric) => ({
    id: "latency", title: what + " latency", axis: "ms",
    note: "Percentiles of the events settled in each second.",
    series: [
      { label: "p50", colour: C.blue, metric, values: col("p50_ms") },
      { label: "p99", colour: C.orange, metric, values: col("p99_ms") },
    ],
  });
  const IN_FLIGHT = (title, unit) => ({
    id: "in-flight", title, axis: "percent",
    note: (S) => {
      const s = S.subject || {};
      const parts = [];
      if (s.max_in_flight_events) parts.push(num(s.max_in_flight_events) + " " + unit);
      if (s.max_in_flight_bytes) parts.push(bytes(s.max_in_flight_bytes));
      return "The most in use in each second, as a share of the limit: " + (parts.join(" · ") || "no limit") + " = 100%.";
    },
    series: [
      {
        label: unit, colour: C.blue, metric: "walrelay_events_in_flight", limitMetric: "walrelay_in_flight_limit_events",
        values: (H, S) => share(col("in_flight_events")(H), S.subject && S.subject.max_in_flight_events),
        raw: col("in_flight_events"), format: num,
      },
      {
        label: "bytes", colour: C.orange, metric: "walrelay_in_flight_bytes", limitMetric: "walrelay_in_flight_limit_bytes",
        values: (H, S) => share(col("in_flight_bytes")(H), S.subject && S.subject.max_in_flight_bytes),
        raw: col("in_flight_bytes"), format: bytes, when: (S) => S.subject && S.subject.max_in_flight_bytes,
      },
    ],
  });
  function share(values, limit) {
    if (!limit) return values.map(() => null);
    return values.map((v) => (missing(v) ? null : Math.min(100, (100 * v) / limit)));
  }
  // The mean of a column's last `n` readings.
  function recent(H, name, n = 10) {
    const v = (H.columns[name] || []).slice(-n).filter((x) => !missing(x));
    return v.length ? v.reduce((a, b) => a + b, 0) / v.length : null;
  }
  // Events a second over the last `n` samples.
  function recentRate(H, name, n = 10) {
    const t = H.columns.t, v = H.columns[name] || [];
    if (t.length === 0) return null;
    const from = Math.max(0, t.length - n);
    let sum = 0;
    for (let i = from; i < t.length; i++) sum += v[i] || 0;
    const span = (t[t.length - 1] - t[from]) / 1000 + H.interval_ms / 1000;
    return span > 0 ? sum / span : null;
  }
  const latencyCard = (label) => (S) => ({
    label, value: ms(S.p50_commit_to_ack_ms) + " · " + ms(S.p99_commit_to_ack_ms),
    sub: "p50 · p99, last minute",
  });
  const totalsCard = (label, what) => (S) => ({
    label, value: num(S.events_published),
    sub: num(S.dead_letters) + " dead letters" + (S.events_skipped ? " · " + num(S.events_skipped) + " already in the log" : "") + (what ? " · " + what : ""),
  });

  const VIEWS = {
    wal: {
      kind: "WAL relay", subjectLabel: "slot", doing: "streaming",
      cards: [
        (S) => ({
          label: "Slot lag", value: bytes(S.slot && S.slot.lag_bytes),
          sub: "confirmed " + (S.confirmed_lsn || "–"),
        }),
        (S) => {
          const r = S.slot && S.slot.retained_wal_bytes, safe = S.slot && S.slot.safe_wal_size;
          const limit = S.max_slot_wal_keep_size_bytes;
          const sub = limit
            ? percent((100 * (r || 0)) / limit) + " of max_slot_wal_keep_size " + bytes(limit) + (missing(safe) ? "" : " · " + bytes(safe) + " until invalidated")
            : "no max_slot_wal_keep_size: kept without limit";
          const danger = S.slot && (S.slot.wal_status === "unreserved" || S.slot.wal_status === "lost");
          return { label: "Retained WAL", value: bytes(r), sub, alert: danger };
        },
        (S, H) => ({
          label: "Events / s", value: rate(recentRate(H, "published")),
          sub: "last 10 s · " + rate(recentRate(H, "dead_lettered")) + " dead-lettered" + NBSP + "/" + NBSP + "s",
        }),
        latencyCard("Commit → ack"),
        (S) => ({
          label: "In flight", value: count(S.in_flight, "event") + " · " + bytes(S.in_flight_bytes),
          sub: "window " + count(S.subject.max_in_flight_events, "event") + " · " + bytes(S.subject.max_in_flight_bytes),
        }),
        (S) => ({
          label: "Slot", value: S.slot ? (S.slot.active ? "active" : "inactive") + (S.slot.wal_status ? " · " + S.slot.wal_status : "") : "not read yet",
          sub: S.host ? "from " + S.host : "not streaming",
          alert: S.slot && (S.slot.wal_status === "unreserved" || S.slot.wal_status === "lost"),
        }),
        totalsCard("Published"),
      ],
      charts: [
        {
          id: "slot", title: "Slot lag and retained WAL", axis: "bytes",
          note: (S) => {
            const limit = S.max_slot_wal_keep_size_bytes;
            if (!limit) return "max_slot_wal_keep_size is -1: PostgreSQL keeps WAL for the slot without limit.";
            const r = (S.slot && S.slot.retained_wal_bytes) || 0;
            return "max_slot_wal_keep_size " + bytes(limit) + ": the slot is invalidated when retained WAL reaches the red line (" + bytes(Math.max(0, limit - r)) + " away" + (r * 3 < limit ? ", off the scale" : "") + ").";
          },
          series: [
            { label: "retained WAL", colour: C.orange, metric: "walrelay_slot_retained_wal_bytes", values: col("retained_wal_bytes") },
            { label: "slot lag", colour: C.blue, metric: "walrelay_slot_lag_bytes", values: col("lag_bytes") },
            {
              label: "invalidated at", colour: C.red, dash: [6, 4], metric: "walrelay_slot_safe_wal_size_bytes", limit: true,
              values: (H) => col("retained_wal_bytes")(H).map((r, i) => {
                const s = H.columns.safe_wal_bytes[i];
                return missing(r) || missing(s) ? null : r + s;
              }),
            },
          ],
        },
        {
          id: "events", title: "Events per second", axis: "rate",
          series: [
            { label: "published", colour: C.green, metric: "walrelay_events_published_total", values: perSecond("published") },
            { label: "dead-lettered", colour: C.red, metric: "walrelay_dead_letters_total", values: perSecond("dead_lettered") },
            { label: "already in the log", colour: C.purple, metric: "walrelay_events_skipped_total", values: perSecond("skipped"), when: (S) => S.delivery === "exactly-once" },
          ],
        },
        LATENCY("Commit → ack", "walrelay_commit_to_ack_seconds"),
        IN_FLIGHT("In flight, against the window", "events"),
      ],
    },
    poll: {
      kind: "Polling source", subjectLabel: "table", doing: "polling",
      cards: [
        (S) => ({ label: "Backlog", value: count(S.backlog && S.backlog.pending_rows, "row"), sub: num(S.backlog && S.backlog.failing_rows) + " failing" }),
        (S) => ({
          label: "Oldest pending", value: S.backlog && S.backlog.pending_rows ? seconds(S.backlog.oldest_pending_seconds) : "none pending",
          sub: "age of the oldest row not yet published",
        }),
        (S, H) => ({ label: "Rows / s", value: rate(recentRate(H, "published")), sub: "last 10 s · " + rate(recentRate(H, "dead_lettered")) + " dead-lettered" + NBSP + "/" + NBSP + "s" }),
        (S, H) => ({ label: "Claim · settle", value: ms(recent(H, "claim_ms")) + " · " + ms(recent(H, "settle_ms")), sub: "mean per batch, last 10 s" }),
        latencyCard("Created → ack"),
        (S) => ({ label: "In flight", value: count(S.in_flight, "row") + " · " + bytes(S.in_flight_bytes), sub: "at most " + count(S.subject.max_in_flight_events, "row") + " (a batch a connection)" }),
        totalsCard("Published"),
      ],
      charts: [
        {
          id: "backlog", title: "Backlog", axis: "count", axis2: "seconds",
          note: "Rows not yet published, and the age of the oldest (right axis).",
          series: [
            { label: "rows", colour: C.blue, metric: "walrelay_outbox_pending_rows", values: col("pending_rows") },
            { label: "oldest", colour: C.orange, metric: "walrelay_outbox_oldest_pending_seconds", values: col("oldest_pending_seconds"), scale: "y2" },
          ],
        },
        {
          id: "events", title: "Rows per second", axis: "rate",
          series: [
            { label: "published", colour: C.green, metric: "walrelay_events_published_total", values: perSecond("published") },
            { label: "dead-lettered", colour: C.red, metric: "walrelay_dead_letters_total", values: perSecond("dead_lettered") },
            { label: "already in the log", colour: C.purple, metric: "walrelay_events_skipped_total", values: perSecond("skipped"), when: (S) => S.delivery === "exactly-once" },
          ],
        },
        {
          id: "claim-settle", title: "Claim and settle times", axis: "ms",
          note: "Per batch: the claim (FOR UPDATE SKIP LOCKED), and the settle (delete or mark, commit) after the broker's acks. Mean; dashed: longest.",
          series: [
            { label: "claim", colour: C.blue, metric: "walrelay_poll_claim_seconds", values: col("claim_ms") },
            { label: "claim, longest", colour: C.blue, dash: [4, 4], metric: "walrelay_poll_claim_seconds", values: col("claim_max_ms") },
            { label: "settle", colour: C.orange, metric: "walrelay_poll_settle_seconds", values: col("settle_ms") },
            { label: "settle, longest", colour: C.orange, dash: [4, 4], metric: "walrelay_poll_settle_seconds", values: col("settle_max_ms") },
          ],
        },
        LATENCY("Created → ack", "walrelay_commit_to_ack_seconds"),
        IN_FLIGHT("In flight, against the batches", "rows"),
      ],
    },
    inbox: {
      kind: "Inbox", subjectLabel: "topics", doing: "consuming",
      cards: [
        (S) => ({ label: "Consumer lag", value: count(S.consumer_lag, "record"), sub: "over " + count((S.inbox && S.inbox.partitions.length) || 0, "partition") }),
        (S, H) => ({ label: "Stored / s", value: rate(recentRate(H, "stored")), sub: "last 10 s" }),
        (S, H) => ({ label: "Duplicates skipped", value: num(S.inbox && S.inbox.duplicates), sub: rate(recentRate(H, "duplicates")) + " / s, last 10 s" }),
        (S, H) => ({ label: "Dead letters", value: num(S.dead_letters), sub: rate(recentRate(H, "dead_lettered")) + " / s, last 10 s", alert: recentRate(H, "dead_lettered") > 0 }),
        latencyCard("Produced → stored"),
        (S) => ({ label: "In hand", value: count(S.in_flight, "record"), sub: "batch " + count(S.subject.max_in_flight_events, "record") }),
        (S) => {
          const held = (S.inbox && S.inbox.partitions) || [];
          return {
            label: "Partitions", value: held.length ? num(held.length) + " assigned" : "none assigned",
            sub: held.map((p) => p.topic + "/" + p.partition).join(" ") + " · group " + (S.subject.group || "–"),
          };
        },
        totalsCard("Stored", null),
      ],
      charts: [
        {
          id: "lag", title: "Consumer lag per partition", axis: "count", partitions: true,
          note: (S, H) => {
            const prefix = commonPrefix(Object.keys(H.partitions));
            return "Records between the inbox's next offset and the high watermark" + (prefix ? " (topics " + prefix + "…)" : "") + ".";
          },
          series: [],
        },
        {
          id: "events", title: "Records per second", axis: "rate",
          series: [
            { label: "stored", colour: C.green, metric: "walrelay_inbox_records_stored_total", values: perSecond("stored") },
            { label: "duplicates skipped", colour: C.purple, metric: "walrelay_inbox_duplicates_skipped_total", values: perSecond("duplicates") },
            { label: "dead letters", colour: C.red, metric: "walrelay_inbox_dead_letters_total", values: perSecond("dead_lettered") },
          ],
        },
        LATENCY("Produced → stored", "walrelay_inbox_produced_to_stored_seconds"),
        IN_FLIGHT("In hand, against the batch", "records"),
      ],
    },
  };

  // ---- states on the time axis --------------------------------------------
  const STATE_STYLE = {
    starting: { colour: C.grey, label: "starting" },
    active: { colour: C.green, label: null },
    standby: { colour: C.blue, label: "standby" },
    waiting_for_broker: { colour: C.amber, label: "waiting for the broker" },
    reconnecting: { colour: C.red, label: "reconnecting" },
  };
  const stateLabel = (state, view) => (state === "active" ? view.doing : STATE_STYLE[state].label);
  const alpha = (hex, a) => hex + Math.round(a * 255).toString(16).padStart(2, "0");

  // Runs of one state: [start ms, end ms, state name].
  function stateRuns(H) {
    const t = H.columns.t, s = H.columns.state, runs = [];
    for (let i = 0; i < t.length; i++) {
      const name = H.states[s[i]] || "starting";
      const start = i > 0 ? t[i - 1] : t[i] - H.interval_ms;
      const last = runs[runs.length - 1];
      if (last && last[2] === name) last[1] = t[i];
      else runs.push([start, t[i], name]);
    }
    return runs;
  }

  function statePlugin() {
    return {
      hooks: {
        drawClear: (u) => {
          const { ctx } = u, { left, top, width, height } = u.bbox;
          ctx.save();
          for (const [a, b, name] of model.runs) {
            if (name === "active") continue;
            const x0 = Math.max(left, u.valToPos(a / 1000, "x", true));
            const x1 = Math.min(left + width, u.valToPos(b / 1000, "x", true));
            if (x1 <= x0) continue;
            ctx.fillStyle = alpha(STATE_STYLE[name].colour, 0.16);
            ctx.fillRect(x0, top, x1 - x0, height);
          }
          ctx.restore();
        },
        draw: (u) => {
          const { ctx } = u, { left, top, width, height } = u.bbox;
          ctx.save();
          ctx.lineWidth = devicePixelRatio;
          ctx.setLineDash([3 * devicePixelRatio, 3 * devicePixelRatio]);
          for (const tr of model.transitions) {
            const x = u.valToPos(tr.unix_ms / 1000, "x", true);
            if (x < left || x > left + width) continue;
            ctx.strokeStyle = STATE_STYLE[tr.state].colour;
            ctx.beginPath(); ctx.moveTo(x, top); ctx.lineTo(x, top + height); ctx.stroke();
          }
          ctx.setLineDash([]);
          ctx.fillStyle = C.red;
          for (const e of model.errors) {
            const x0 = u.valToPos(e.first_ms / 1000, "x", true);
            const x1 = u.valToPos((e.resolved_ms || e.last_ms) / 1000, "x", true);
            if (x1 < left || x0 > left + width) continue;
            const a = Math.max(left, x0), b = Math.min(left + width, Math.max(x1, x0 + 3 * devicePixelRatio));
            ctx.fillRect(a, top, b - a, 3 * devicePixelRatio);
          }
          ctx.restore();
        },
      },
    };
  }

  // ---- the page's model ----------------------------------------------------
  const model = {
    view: null, source: null, S: null,
    H: null, // {interval_ms, capacity, states, columns: {t, state, ...}, partitions: {name: []}}
    transitions: [], runs: [], errors: [],
    windowSeconds: Number(localStorage.getItem("walrelay.window")) || 900,
    charts: [], loadedAt: Date.now(), serverOffset: 0, failedSince: null,
  };
  const serverNow = () => Date.now() + model.serverOffset;

  function appendHistory(part) {
    const H = model.H;
    if (!H) {
      model.H = part;
      model.transitions = part.transitions;
      return;
    }
    const before = H.columns.t.length;
    for (const [name, values] of Object.entries(part.columns)) {
      if (!H.columns[name]) H.columns[name] = new Array(before).fill(null);
      H.columns[name].push(...values);
    }
    const added = part.columns.t.length;
    for (const [name, values] of Object.entries(part.partitions)) {
      if (!H.partitions[name]) H.partitions[name] = new Array(before).fill(null);
      H.partitions[name].push(...values);
    }
    for (const values of Object.values(H.partitions)) {
      while (values.length < before + added) values.push(null);
    }
    const extra = H.columns.t.length - H.capacity;
    if (extra > 0) {
      for (const values of Object.values(H.columns)) values.splice(0, extra);
      for (const values of Object.values(H.partitions)) values.splice(0, extra);
    }
    model.transitions.push(...part.transitions);
    if (model.transitions.length > 512) model.transitions.splice(0, model.transitions.length - 512);
  }

  async function fetchJson(path) {
    const r = await fetch(path, { cache: "no-store" });
    if (!r.ok) throw new Error(path + ": HTTP " + r.status);
    return r.json();
  }

  // ---- rendering -----------------------------------------------------------
  function renderHeader(S) {
    const view = model.view;
    $("kind").textContent = view.kind;
    const subject = (S.subject && S.subject.name) || S.slot_name || "";
    const label = model.source === "inbox"
      ? (subject.split(" ").some((t) => t.startsWith("^")) ? "topics matching" : "topics")
      : model.source === "poll" && subject.includes(",") ? "tables" : view.subjectLabel;
    $("subject-label").textContent = label;
    words($("subject"), subject);
    const state = S.state;
    const badge = $("state");
    const since = S.state_since_unix_ms ? " since " + clock(S.state_since_unix_ms) : "";
    let text, cls;
    if (model.failedSince) {
      text = "● walrelay does not answer (since " + clock(model.failedSince) + ")";
      cls = "bad";
    } else if (state === "active") {
      text = "● " + view.doing + (S.host && model.source !== "inbox" ? " from " + S.host : "") + since;
      cls = S.broker_reachable ? "ok" : "warn";
      if (!S.broker_reachable) text += " · broker unreachable";
    } else if (state === "standby") {
      text = "● standby: another relay holds the slot" + since; cls = "muted-badge";
    } else if (state === "waiting_for_broker") {
      text = "● waiting for the broker: " + ({
        poll: "the batch stays claimed, nothing new is claimed",
        inbox: "nothing is consumed until it answers",
      }[model.source] || "the slot is released, PostgreSQL is not held") + since;
      cls = "warn";
    } else {
      text = "● " + (STATE_STYLE[state] ? STATE_STYLE[state].label : state) + since; cls = "bad";
    }
    words(badge, text);
    badge.className = "badge " + cls;
    badge.title = S.reason || "";
    words($("delivery"), S.delivery || "");
    const role = model.source === "wal" ? "role " + S.role : model.source === "inbox" && S.subject.table ? "into " + S.subject.table : "";
    words($("role"), role);
    $("role").hidden = !role;
    document.title = "walrelay · " + view.kind + " · " + subject;
  }

  function renderCards(S, H) {
    const cards = model.view.cards.map((f) => f(S, H));
    const box = $("cards");
    while (box.children.length < cards.length) {
      const card = el("div", "card");
      card.append(el("div", "label"), el("div", "value"), el("div", "sub"));
      box.append(card);
    }
    cards.forEach((c, i) => {
      const card = box.children[i];
      card.className = "card" + (c.alert ? " alert" : "");
      words(card.children[0], c.label);
      words(card.children[1], c.value);
      card.children[1].className = "value" + (c.long || String(c.value).length > 22 ? " long" : "");
      words(card.children[2], c.sub || "");
    });
  }

  function renderError(S) {
    const box = $("error");
    const errors = S.errors || [];
    const last = errors[0];
    box.replaceChildren();
    const head = el("div", "head");
    box.append(head);
    if (!last) {
      box.className = "panel error-panel";
      head.append(el("span", "tag none", "no errors"), el("span", "muted", "since start at " + clock(S.started_unix_ms) + " (" + ago(S.started_unix_ms) + " ago)"));
      return;
    }
    const holds = last.resolved_ms === null || last.resolved_ms === undefined;
    box.className = "panel error-panel" + (holds ? " current" : "");
    head.append(el("h2", null, "Last error"));
    head.append(el("span", "tag " + (holds ? "current" : "past"), holds ? "still failing" : "past"));
    head.append(el("span", "muted", describeError(last)));
    box.append(el("p", "message", last.message));
    if (errors.length > 1) {
      const details = document.createElement("details");
      details.append(el("summary", null, "Earlier errors (" + (errors.length - 1) + ")"));
      const list = document.createElement("ol");
      for (const e of errors.slice(1)) {
        const li = document.createElement("li");
        li.append(el("span", "muted", describeError(e) + ": "), el("span", "message", e.message));
        list.append(li);
      }
      details.append(list);
      box.append(details);
    }
  }

  // Partitions with no leader: their records wait outside transactions,
  // every other partition's go on, nothing is confirmed past them.
  function renderHeld(S) {
    const box = $("held");
    const held = S.held_partitions || [];
    box.hidden = held.length === 0;
    box.replaceChildren();
    if (!held.length) return;
    const head = el("div", "head");
    head.append(el("h2", null, "Partitions without a leader"), el("span", "tag current", "their events wait"));
    box.append(head);
    const list = document.createElement("ul");
    for (const h of held) {
      const li = document.createElement("li");
      li.append(el("span", "message", h.topic + " [" + h.partition + "]"),
        el("span", "muted", " since " + clock(h.since_unix_ms) + " (" + ago(h.since_unix_ms) + " ago)"));
      list.append(li);
    }
    box.append(list);
    box.append(el("p", "muted", "Every other partition's events go on; nothing is confirmed to PostgreSQL past the waiting ones. They go once a broker holding a replica is back."));
  }

  const RECOVERY = {
    reconnected: "connected again",
    acknowledged: "events acknowledged since",
    quiet: "not seen again for 15 s while active, the broker answering",
    broker_answered: "the broker acknowledged again",
  };
  function describeError(e) {
    let s = "at " + clock(e.first_ms) + " (" + ago(e.first_ms) + " ago)";
    if (e.count > 1) s += ", " + e.count + " times, last at " + clock(e.last_ms);
    if (e.resolved_ms) s += "; over at " + clock(e.resolved_ms) + ": " + (RECOVERY[e.resolved_by] || e.resolved_by);
    return s;
  }

  function renderTimeline(H) {
    const strip = $("strip");
    const [x0, x1] = xRange(H);
    const span = (x1 - x0) * 1000;
    const segs = [];
    for (const [a, b, name] of model.runs) {
      const from = Math.max(a, x0 * 1000), to = Math.min(b, x1 * 1000);
      if (to <= from) continue;
      const seg = document.createElement("div");
      seg.className = "seg";
      seg.style.left = ((100 * (from - x0 * 1000)) / span) + "%";
      seg.style.width = ((100 * (to - from)) / span) + "%";
      seg.style.background = alpha(STATE_STYLE[name].colour, name === "active" ? 0.55 : 0.85);
      seg.title = stateLabel(name, model.view) + ", " + clock(a) + " to " + clock(b) + " (" + seconds((b - a) / 1000) + ")";
      seg.dataset.state = name;
      segs.push(seg);
    }
    // A change shorter than a sample still shows: a mark where it began.
    for (const tr of model.transitions) {
      if (tr.state === "active" || tr.unix_ms < x0 * 1000) continue;
      const mark = document.createElement("div");
      mark.className = "mark";
      mark.style.left = ((100 * (tr.unix_ms - x0 * 1000)) / span) + "%";
      mark.style.background = STATE_STYLE[tr.state].colour;
      mark.title = stateLabel(tr.state, model.view) + " at " + clock(tr.unix_ms);
      segs.push(mark);
    }
    for (const e of model.errors) {
      if (e.first_ms < x0 * 1000) continue;
      const mark = document.createElement("div");
      mark.className = "err";
      mark.style.left = ((100 * (e.first_ms - x0 * 1000)) / span) + "%";
      mark.title = "error at " + clock(e.first_ms) + ": " + e.message;
      segs.push(mark);
    }
    strip.replaceChildren(...segs);
    const legend = $("strip-legend");
    if (!legend.childElementCount) {
      for (const [name, style] of Object.entries(STATE_STYLE)) {
        const item = document.createElement("span");
        const swatch = document.createElement("i");
        swatch.style.background = style.colour;
        item.append(swatch, el("span", null, stateLabel(name, model.view)));
        legend.append(item);
      }
      const item = document.createElement("span");
      const swatch = document.createElement("i");
      swatch.style.background = C.red;
      swatch.style.height = ".3rem";
      item.append(swatch, el("span", null, "error"));
      legend.append(item);
    }
    const changes = $("changes");
    const recentChanges = model.transitions.slice(-6);
    changes.replaceChildren(...recentChanges.map((t) => {
      const li = el("li", null, clock(t.unix_ms) + " " + stateLabel(t.state, model.view));
      li.dataset.state = t.state;
      return li;
    }));
    if (recentChanges.length) changes.prepend(el("li", null, "Changes:"));
  }

  // The window chosen, or less while the process is younger: the charts
  // use their whole width for what there is (at least a minute).
  function xRange(H) {
    const t = H.columns.t;
    const end = t.length ? t[t.length - 1] / 1000 : serverNow() / 1000;
    const first = t.length ? t[0] / 1000 - H.interval_ms / 1000 : end;
    const start = Math.max(end - model.windowSeconds, Math.min(first, end - 60));
    return [start, end + 0.5];
  }

  // ---- charts --------------------------------------------------------------
  // What partition names share up to a dot ("ns.outbox.event."): said once
  // in the note, left out of the legend.
  function commonPrefix(names) {
    if (!names.length) return "";
    let prefix = names[0];
    for (const n of names) while (!n.startsWith(prefix)) prefix = prefix.slice(0, -1);
    return prefix.slice(0, prefix.lastIndexOf(".") + 1);
  }

  function chartSeries(def, S, H) {
    if (!def.partitions) return def.series.filter((s) => !s.when || s.when(S));
    const names = Object.keys(H.partitions).sort();
    const prefix = commonPrefix(names);
    return names.map((name, i) => ({
      label: name.slice(prefix.length), name, colour: PARTITION_COLOURS[i % PARTITION_COLOURS.length],
      metric: "walrelay_inbox_consumer_lag_records", values: (h) => h.partitions[name],
    }));
  }

  function buildChart(def, S, H) {
    const box = el("section", "panel chart");
    box.dataset.chart = def.id;
    const title = el("h2", null, def.title);
    const note = el("p", "note muted");
    const plot = el("div", "plot");
    box.append(title, note, plot);
    $("charts").append(box);
    const series = chartSeries(def, S, H);
    // The scale fits the data, not the limits: a limit far above the data
    // is named in the note instead of flattening the lines.
    const scale = (kind, key) => ({
      // Latencies on a log scale: a 5 s stall and a 5 ms p50 both read.
      ...(kind === "ms" ? { distr: 3, log: 10 } : {}),
      range: (u) => {
        if (kind === "percent") return [0, 100];
        if (kind === "ms") {
          const hi = topOf(u.data, series, key, false);
          if (!hi) return [1, 100];
          return uPlot.rangeLog(Math.max(bottomOf(u.data, series, key), 0.01), hi, 10, true);
        }
        const dataTop = topOf(u.data, series, key, false);
        let top = Math.max(AXES[kind][2], dataTop);
        const limitTop = topOf(u.data, series, key, true);
        if (limitTop > 0 && limitTop <= 3 * dataTop) top = Math.max(top, limitTop);
        return [0, top * 1.1];
      },
    });
    const axis = (kind, side) => {
      const [axisIncrs, axisFormat] = AXES[kind];
      return {
        scale: side === 1 ? "y2" : "y", side: side === 1 ? 1 : 3,
        stroke: C.muted, font: "12px system-ui, sans-serif", size: axisSize, gap: 4,
        // (uPlot takes a key given as undefined as the value: only set it
        // where it applies.)
        grid: { show: side !== 1, stroke: C.line, width: 1, ...(kind === "ms" ? { filter: powersOfTen } : {}) },
        ticks: { stroke: C.line, width: 1, size: 4, ...(kind === "ms" ? { filter: powersOfTen } : {}) },
        // A log axis leaves out some splits' labels (null).
        incrs: axisIncrs, values: (u, splits) => splits.map((v) => (v === null ? null : axisFormat(v))), space: 28,
      };
    };
    const axes = [
      {
        stroke: C.muted, font: "12px system-ui, sans-serif", grid: { stroke: C.line, width: 1 }, ticks: { stroke: C.line, width: 1, size: 4 },
        // Ticks on whole minutes (1, 2, 5 …) or seconds; HH:MM labels
        // need less room than HH:MM:SS ones.
        incrs: [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200],
        space: (self, axisIdx, min, max) => (max - min > 300 ? 50 : 72),
        values: (u, splits, ax, space, incr) => splits.map((s) => clock(s * 1000, incr < 60)),
      },
      axis(def.axis, 3),
    ];
    const scales = { x: { time: true, range: () => xRange(model.H) }, y: scale(def.axis, "y") };
    if (def.axis2) {
      axes.push(axis(def.axis2, 1));
      scales.y2 = scale(def.axis2, "y2");
    }
    const opts = {
      width: Math.max(200, plot.clientWidth), height: plotHeight(),
      cursor: { sync: { key: "walrelay" }, drag: { x: false, y: false }, points: { size: 6 } },
      legend: { live: true },
      scales, axes,
      series: [
        { value: (u, v) => (v === null ? "–" : clock(v * 1000)) },
        ...series.map((s) => {
          const [, fmt] = AXES[s.scale === "y2" ? def.axis2 : def.axis];
          return {
            label: s.label, stroke: s.colour, width: 2, scale: s.scale || "y", ...(s.dash ? { dash: s.dash } : {}),
            points: { show: false }, spanGaps: false,
            value: (u, v, si, idx) => {
              if (s.raw && idx !== null && idx !== undefined) {
                const raw = s.raw(model.H)[idx];
                return missing(raw) ? "–" : s.format(raw) + (missing(v) ? "" : " (" + percent(v) + ")");
              }
              if (missing(v)) return "–";
              if (s.scale === "y2") return fmt(v);
              return def.axis === "rate" ? rate(v) + NBSP + "/" + NBSP + "s" : def.axis === "ms" ? ms(v) : fmt(v);
            },
          };
        }),
      ],
      plugins: [statePlugin()],
    };
    const u = new uPlot(opts, chartData(series, S, H), plot);
    const chart = { def, u, box, note, series, key: series.map((s) => s.label).join("|") };
    new ResizeObserver(() => {
      const w = Math.max(200, plot.clientWidth);
      if (Math.abs(w - u.width) > 1) u.setSize({ width: w, height: plotHeight() });
    }).observe(plot);
    return chart;
  }

  // The largest value of the series on scale `key`: the limits' or the data's.
  function topOf(data, series, key, limits) {
    let top = 0;
    series.forEach((s, i) => {
      if (Boolean(s.limit) !== limits || (s.scale || "y") !== key) return;
      for (const v of data[i + 1] || []) if (!missing(v)) top = Math.max(top, v);
    });
    return top;
  }

  // A log axis: lines at 1, 10, 100 … only.
  const powersOfTen = (u, splits) => splits.map((v) => (Math.abs(Math.log10(v) - Math.round(Math.log10(v))) < 1e-9 ? v : null));

  // The smallest value above zero of the series on scale `key`.
  function bottomOf(data, series, key) {
    let bottom = Infinity;
    series.forEach((s, i) => {
      if (s.limit || (s.scale || "y") !== key) return;
      for (const v of data[i + 1] || []) if (!missing(v) && v > 0) bottom = Math.min(bottom, v);
    });
    return bottom === Infinity ? 1 : bottom;
  }

  const plotHeight = () => (window.innerWidth < 600 ? 170 : 210);

  function chartData(series, S, H) {
    return [H.columns.t.map((t) => t / 1000), ...series.map((s) => s.values(H, S).map((v) => (missing(v) ? null : v)))];
  }

  function renderCharts(S, H) {
    if (!model.charts.length) {
      model.charts = model.view.charts.map((def) => buildChart(def, S, H));
    }
    model.charts = model.charts.map((chart) => {
      const series = chartSeries(chart.def, S, H);
      if (series.map((s) => s.label).join("|") !== chart.key) {
        // New partitions (or series shown only in some modes): rebuild.
        const next = buildChart(chart.def, S, H);
        chart.u.destroy();
        chart.box.replaceWith(next.box);
        return next;
      }
      chart.u.setData(chartData(series, S, H));
      const note = typeof chart.def.note === "function" ? chart.def.note(S, H) : chart.def.note || "";
      words(chart.note, note);
      chart.note.hidden = !note;
      if (chart.u.cursor.idx === null || chart.u.cursor.idx === undefined) {
        chart.u.setLegend({ idx: H.columns.t.length - 1 });
      }
      return chart;
    });
  }

  // What the page shows, for people reading the DOM and for the tests.
  function publish(H) {
    const t0 = H.columns.t[0];
    window.walrelayDashboard = {
      source: model.source,
      loadedAt: model.loadedAt,
      samples: H.columns.t.length,
      firstSampleMs: t0,
      charts: model.charts.map((c) => ({
        id: c.def.id,
        title: c.def.title,
        // The tick labels last drawn on each y axis.
        axes: c.u.axes.slice(1).map((a) => a._values || []),
        series: c.series.map((s, i) => {
          const values = c.u.data[i + 1] || [];
          const xs = c.u.data[0];
          let first = null, readings = 0;
          values.forEach((v, j) => { if (!missing(v)) { readings++; if (first === null) first = xs[j] * 1000; } });
          return { label: s.label, name: s.name || s.label, metric: s.metric, limitMetric: s.limitMetric || null, readings, firstReadingMs: first };
        }),
      })),
      stateMetric: "walrelay_state",
    };
    document.body.dataset.ready = "1";
  }

  // ---- the loop ------------------------------------------------------------
  let lastT = 0;
  async function tick() {
    try {
      const part = await fetchJson("api/history" + (lastT ? "?since=" + lastT : ""));
      const S = await fetchJson("api/status");
      model.serverOffset = S.now_unix_ms - Date.now();
      model.failedSince = null;
      if (!model.view) {
        model.source = S.source || "wal";
        model.view = VIEWS[model.source] || VIEWS.wal;
        document.body.dataset.source = model.source;
      }
      appendHistory(part);
      const H = model.H;
      if (H.columns.t.length) lastT = H.columns.t[H.columns.t.length - 1];
      model.S = S;
      model.errors = S.errors || [];
      model.runs = stateRuns(H);
      renderHeader(S);
      renderError(S);
      renderHeld(S);
      renderCards(S, H);
      renderTimeline(H);
      renderCharts(S, H);
      const mem = S.history || {};
      words($("memory"), "History: " + num(mem.samples) + " of " + num(mem.capacity) + " samples, one a second; " + bytes(mem.heap_bytes) + " in walrelay's memory.");
      $("updated").textContent = clock(Date.now());
      publish(H);
    } catch (e) {
      model.failedSince = model.failedSince || Date.now();
      if (model.S) renderHeader(model.S);
      else words($("state"), "● walrelay does not answer: " + e.message);
      $("state").className = "badge bad";
    }
    setTimeout(tick, 1000);
  }

  for (const b of document.querySelectorAll("[data-window]")) {
    const seconds = Number(b.dataset.window);
    b.setAttribute("aria-pressed", String(seconds === model.windowSeconds));
    b.addEventListener("click", () => {
      model.windowSeconds = seconds;
      localStorage.setItem("walrelay.window", String(seconds));
      for (const o of document.querySelectorAll("[data-window]")) o.setAttribute("aria-pressed", String(o === b));
      if (model.H && model.S) {
        renderTimeline(model.H);
        for (const c of model.charts) c.u.setScale("x", { min: xRange(model.H)[0], max: xRange(model.H)[1] });
      }
    });
  }
  tick();
})();
