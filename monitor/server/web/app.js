// repwatch dashboard: polls the JSON API of the server that serves it and draws SVG line charts
// with a small renderer of its own (axes, ticks, hover values, NaN gaps, log y). No dependencies.
"use strict";

(function () {
  const POLL_MS = 2000;
  const MAX_POINTS = 2000;          // snapshots kept in the page per run
  const FIRST_LIMIT = 1000;         // snapshots asked for on the first load of a run
  const SVGNS = "http://www.w3.org/2000/svg";

  const SCOPES = [
    ["stream", "streams", "Stream"], ["layer", "layers", "Layer (plasticity)"],
    ["param", "params", "Parameter"], ["run", "run_signals", "Model"],
  ];

  const state = {
    run: null, runs: [], latest: null, history: [], lastStep: null, spectra: {},
    hover: {}, failures: 0, timer: null, busy: false, peakSpectra: {},
  };
  const $ = (id) => document.getElementById(id);

  // ---------- signals ----------
  // Signals shown first, in this order (the rest go under "more signals"), with short labels.
  const LABELS = {
    effective_rank: "effective rank (RankMe)",
    effective_rank_ratio: "effective rank / min(n, d)",
    effective_rank_peak_ratio: "effective rank / run peak",
    embedding_std_ratio: "std ratio (collapse → 0)",
    mean_cosine_similarity: "mean cosine similarity",
    top_eigenvalue_share: "top eigenvalue share",
    low_quality_samples_ratio: "low-quality samples (Q-Score)",
    participation_ratio: "participation ratio",
    spectrum_alpha: "spectrum decay α",
    srank: "srank",
    "dormant_units_ratio{tau=0}": "dead units",
    "dormant_units_ratio{tau=0.1}": "dormant units τ=0.1",
    "dormant_units_ratio{tau=0.025}": "dormant units τ=0.025",
    low_activity_units_ratio: "low-activity units",
  };
  const PRIMARY = {
    stream: ["effective_rank", "effective_rank_ratio", "effective_rank_peak_ratio",
      "embedding_std_ratio", "mean_cosine_similarity", "top_eigenvalue_share",
      "low_quality_samples_ratio", "participation_ratio", "spectrum_alpha", "srank"],
    layer: ["dormant_units_ratio{tau=0}", "dormant_units_ratio{tau=0.1}",
      "dormant_units_ratio{tau=0.025}", "low_activity_units_ratio", "effective_rank",
      "effective_rank_peak_ratio", "participation_ratio"],
    param: [],
    run: [],
  };
  // y-axis references, so that noise is not stretched to full height: signals that live in 0–1
  // (fractions, shares, cosines, ratios to a reference where 1 is "as before") always show 0–1;
  // ranks, counts and sizes always show 0; any other axis spans at least MIN_SPAN of its level.
  const UNIT_RANGE = new Set([
    "effective_rank_ratio", "effective_rank_peak_ratio", "effective_rank_baseline_ratio",
    "embedding_std_ratio", "embedding_variance_ratio", "mean_cosine_similarity",
    "top_eigenvalue_share", "low_quality_samples_ratio", "negative_values_ratio",
    "dormant_units_ratio", "dormant_units_ratio_rise", "low_activity_units_ratio",
    "never_active_units_ratio", "qscore_auprc", "qscore_misclassified_ratio",
    "generator_diversity_ratio", "generator_duplicate_rate", "generator_effective_rank_ratio",
    "earlybird_mask_distance", "earlybird_ticket_found", "neural_collapse_nc4",
  ]);
  const FROM_ZERO = new Set([
    "effective_rank", "effective_rank_peak", "srank", "participation_ratio", "window_samples",
    "embedding_dim", "embedding_variance", "activation_units", "weight_norm", "weight_abs_mean",
    "grad_norm", "weight_rank", "weight_stable_rank", "neural_collapse_classes",
  ]);
  const MIN_SPAN = 0.1;
  function yReference(signal) {
    const base = signal.split("{")[0];
    if (UNIT_RANGE.has(base)) return { include: [0, 1] };
    if (FROM_ZERO.has(base)) return { include: [0] };
    return { minSpan: MIN_SPAN };
  }

  // ---------- formatting ----------
  function fmt(v) {
    if (v === null || v === undefined || !Number.isFinite(v)) return "–";
    const a = Math.abs(v);
    if (a === 0) return "0";
    if (a >= 1e5 || a < 1e-3) return v.toExponential(2);
    if (Number.isInteger(v)) return String(v);
    return v.toPrecision(a >= 100 ? 4 : 3).replace(/\.?0+$/, "");
  }
  function fmtCount(v) {
    return Number.isFinite(v) ? Math.round(v).toLocaleString("en-US") : "–";
  }
  function el(tag, attrs, text) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function svgEl(tag, attrs, text) {
    const e = document.createElementNS(SVGNS, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
    if (text !== undefined) e.textContent = text;
    return e;
  }
  const finite = (v) => typeof v === "number" && Number.isFinite(v);

  // ---------- scales and ticks ----------
  function niceStep(span, count) {
    const raw = span / Math.max(1, count);
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const n = raw / mag;
    return (n >= 5 ? 10 : n >= 2 ? 5 : n >= 1 ? 2 : 1) * mag;
  }
  function linearTicks(lo, hi, count) {
    if (!(hi > lo)) return [lo];
    const step = niceStep(hi - lo, count);
    const out = [];
    for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) {
      out.push(Math.abs(t) < step * 1e-9 ? 0 : t);
    }
    return out;
  }
  function logTicks(lo, hi) {         // lo, hi: log10 of the domain; returns log10 positions
    const a = Math.floor(lo), b = Math.ceil(hi);
    const every = Math.max(1, Math.ceil((b - a) / 5));
    const mults = hi - lo < 2 ? [1, 2, 5] : [1];
    const out = [];
    for (let e = a; e <= b; e += every) {
      for (const m of mults) {
        const t = e + Math.log10(m);
        if (t >= lo - 1e-9 && t <= hi + 1e-9) out.push(t);
      }
    }
    if (out.length >= 2) return out;
    // less than a factor of ~2.5 in range: linear ticks, placed on the log axis
    return linearTicks(Math.pow(10, lo), Math.pow(10, hi), 3).filter((t) => t > 0).map(Math.log10);
  }
  function expLabel(e) {
    if (!Number.isInteger(e)) return fmt(Math.pow(10, e));
    const sup = { "-": "⁻", 0: "⁰", 1: "¹", 2: "²", 3: "³", 4: "⁴", 5: "⁵", 6: "⁶", 7: "⁷", 8: "⁸", 9: "⁹" };
    if (e === 0) return "1";
    if (e === 1) return "10";
    return "10" + String(e).split("").map((c) => sup[c]).join("");
  }

  // ---------- the chart renderer ----------
  // spec: {id, series: [{name, color, dash, xs, ys}], logY, markers: [{x, cls, label}],
  //        xLabel, include: [values the y axis always shows], minSpan: least y span relative
  //        to the largest |y| (linear axes)}
  function drawChart(svg, spec) {
    const W = Math.max(200, svg.clientWidth || svg.parentNode.clientWidth || 300);
    const H = 160, L = 46, R = 10, T = 8, B = 22;
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
    svg.replaceChildren();
    const ty = (v) => (spec.logY ? (v > 0 ? Math.log10(v) : NaN) : v);
    let xmin = Infinity, xmax = -Infinity, ymin = Infinity, ymax = -Infinity, points = 0;
    for (const s of spec.series) {
      for (let i = 0; i < s.xs.length; i++) {
        const y = ty(s.ys[i]);
        if (!finite(s.xs[i]) || !finite(y)) continue;
        points++;
        xmin = Math.min(xmin, s.xs[i]); xmax = Math.max(xmax, s.xs[i]);
        ymin = Math.min(ymin, y); ymax = Math.max(ymax, y);
      }
    }
    svg.dataset.points = String(points);
    if (!points) {
      svg.append(svgEl("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, "no finite values yet"));
      return;
    }
    if (xmax === xmin) { xmin -= 1; xmax += 1; }
    const dataMin = ymin;
    for (const v of spec.include || []) {
      const y = ty(v);
      if (finite(y)) { ymin = Math.min(ymin, y); ymax = Math.max(ymax, y); }
    }
    if (!spec.logY && spec.minSpan && ymax > ymin) {
      const least = spec.minSpan * Math.max(Math.abs(ymax), Math.abs(ymin));
      if (ymax - ymin < least) {
        const mid = (ymax + ymin) / 2;
        ymin = mid - least / 2; ymax = mid + least / 2;
        if (dataMin >= 0 && ymin < 0) { ymax -= ymin; ymin = 0; }   // keep a positive signal's axis >= 0
      }
    }
    if (ymax === ymin) {
      const pad = spec.logY ? 0.5 : Math.abs(ymax) * 0.1 || 1;
      ymin -= pad; ymax += pad;
    } else {
      const pad = (ymax - ymin) * 0.06;
      ymax += pad;
      ymin = !spec.logY && ymin >= 0 && ymin - pad < 0 ? 0 : ymin - pad;
    }
    // the drawn y domain (tests read it; log axes in values, not exponents)
    svg.dataset.ymin = String(spec.logY ? Math.pow(10, ymin) : ymin);
    svg.dataset.ymax = String(spec.logY ? Math.pow(10, ymax) : ymax);
    const px = (x) => L + ((x - xmin) / (xmax - xmin)) * (W - L - R);
    const py = (y) => T + (1 - (y - ymin) / (ymax - ymin)) * (H - T - B);

    const g = svgEl("g");
    const yt = spec.logY ? logTicks(ymin, ymax) : linearTicks(ymin, ymax, 4);
    for (const t of yt) {
      g.append(svgEl("line", { class: "gridline", x1: L, x2: W - R, y1: py(t), y2: py(t) }));
      g.append(svgEl("text", { x: L - 4, y: py(t) + 3, "text-anchor": "end" },
        spec.logY ? expLabel(t) : fmt(t)));
    }
    const xt = linearTicks(xmin, xmax, Math.max(2, Math.floor((W - L - R) / 70)));
    for (const t of xt) {
      g.append(svgEl("line", { class: "axis", x1: px(t), x2: px(t), y1: H - B, y2: H - B + 4 }));
      g.append(svgEl("text", { x: px(t), y: H - 6, "text-anchor": "middle" }, fmt(t)));
    }
    g.append(svgEl("line", { class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B }));
    g.append(svgEl("line", { class: "axis", x1: L, x2: L, y1: T, y2: H - B }));
    if (spec.xLabel) {                       // under the y labels, left of the x axis
      g.append(svgEl("text", { x: 2, y: H - 6 }, spec.xLabel));
    }
    for (const m of spec.markers || []) {
      if (m.x < xmin || m.x > xmax) continue;
      const line = svgEl("line", { class: `marker ${m.cls}`, x1: px(m.x), x2: px(m.x), y1: T, y2: H - B });
      line.append(svgEl("title", {}, m.label));
      g.append(line);
    }
    for (const s of spec.series) {           // a path per series; NaN / null break the line
      let d = "", pen = false;
      for (let i = 0; i < s.xs.length; i++) {
        const y = ty(s.ys[i]);
        if (!finite(s.xs[i]) || !finite(y)) { pen = false; continue; }
        d += `${pen ? "L" : "M"}${px(s.xs[i]).toFixed(1)} ${py(y).toFixed(1)}`;
        pen = true;
      }
      // a lone point between gaps has no length: draw it as a dot
      const path = svgEl("path", { class: "line" + (s.dash ? " dash" : ""), d, stroke: s.color });
      g.append(path);
      for (let i = 0; i < s.xs.length; i++) {
        const y = ty(s.ys[i]);
        const prev = i > 0 ? ty(s.ys[i - 1]) : NaN, next = i + 1 < s.xs.length ? ty(s.ys[i + 1]) : NaN;
        if (finite(y) && !finite(prev) && !finite(next)) {
          g.append(svgEl("circle", { cx: px(s.xs[i]), cy: py(y), r: 2, fill: s.color }));
        }
      }
    }
    svg.append(g);

    // hover: nearest x of the first series, values of every series there
    const hit = svgEl("rect", { class: "hit", x: L, y: T, width: W - L - R, height: H - T - B });
    const cursor = svgEl("g", { "pointer-events": "none" });
    svg.append(cursor, hit);
    const xsAll = spec.series[0].xs;
    function show(clientX) {
      const box = svg.getBoundingClientRect();
      const xv = xmin + ((clientX - box.left) * (W / box.width) - L) / (W - L - R) * (xmax - xmin);
      let best = 0;
      for (let i = 1; i < xsAll.length; i++) {
        if (Math.abs(xsAll[i] - xv) < Math.abs(xsAll[best] - xv)) best = i;
      }
      state.hover[spec.id] = xsAll[best];
      paintCursor(xsAll[best]);
    }
    function paintCursor(xv) {
      cursor.replaceChildren();
      if (xv === undefined || xv < xmin || xv > xmax) return;
      const x = px(xv);
      cursor.append(svgEl("line", { class: "cursor", x1: x, x2: x, y1: T, y2: H - B }));
      const lines = [`${spec.xLabel || "x"} ${fmt(xv)}`];
      for (const s of spec.series) {
        const i = s.xs.indexOf(xv);
        const v = i >= 0 ? s.ys[i] : null;
        lines.push(`${s.name}: ${fmt(v)}`);
        const y = ty(v);
        if (finite(y)) cursor.append(svgEl("circle", { cx: x, cy: py(y), r: 3, fill: s.color }));
      }
      const tw = Math.max(...lines.map((t) => t.length)) * 6.2 + 10, th = lines.length * 13 + 6;
      const tx = x + 8 + tw > W - R ? x - 8 - tw : x + 8;
      cursor.append(svgEl("rect", { class: "tipbox", x: tx, y: T, width: tw, height: th, rx: 3 }));
      lines.forEach((t, k) => cursor.append(svgEl("text", { class: "tiptext", x: tx + 5, y: T + 14 + k * 13 }, t)));
    }
    hit.addEventListener("pointermove", (ev) => show(ev.clientX));
    hit.addEventListener("pointerdown", (ev) => show(ev.clientX));
    hit.addEventListener("pointerleave", () => { delete state.hover[spec.id]; paintCursor(undefined); });
    if (state.hover[spec.id] !== undefined) paintCursor(state.hover[spec.id]);
  }

  // ---------- chart cards (created once, redrawn on each poll) ----------
  function card(container, id, title, key) {
    let c = container.querySelector(`[data-card="${CSS.escape(id)}"]`);
    if (!c) {
      c = el("figure", { class: "chart", "data-card": id });
      c.style.margin = "0";
      const h = el("h3");
      h.append(document.createTextNode(title));
      if (key && key !== title) h.append(el("span", { class: "key" }, key));
      h.append(el("span", { class: "now" }));
      const svg = svgEl("svg", { role: "img", "data-chart": id, "aria-label": title });
      c.append(h, svg, el("div", { class: "legend" }));
      container.append(c);
    }
    return c;
  }
  function legend(c, series) {
    const lg = c.querySelector(".legend");
    lg.replaceChildren(...series.map((s) => {
      const span = el("span");
      const i = el("i", { class: s.dash ? "dash" : "" });
      i.style.borderTopColor = s.color;
      span.append(i, document.createTextNode(s.name));
      return span;
    }));
  }
  const color = (k) => `var(--s${k % 6})`;

  // ---------- theme toggle (also the report's) ----------
  // The #theme button cycles auto → dark → light, then redraws (colours come from CSS);
  // ``remember``: keep the choice in localStorage for the next visit.
  function initTheme(redraw, remember) {
    const btn = $("theme");
    const order = ["auto", "dark", "light"];
    const current = () => document.documentElement.dataset.theme || "auto";
    const label = () => { btn.textContent = `◐ ${current()}`; };
    label();
    btn.addEventListener("click", () => {
      const next = order[(order.indexOf(current()) + 1) % order.length];
      if (next === "auto") delete document.documentElement.dataset.theme;
      else document.documentElement.dataset.theme = next;
      if (remember) {
        try { localStorage.setItem("repwatch-theme", next); } catch (e) { /* storage off */ }
      }
      label();
      redraw();
    });
  }

  // ---------- data ----------
  async function getJSON(url) {
    const r = await fetch(url, { cache: "no-store" });
    if (!r.ok) throw new Error(`${url}: HTTP ${r.status}`);
    return r.json();
  }
  const enc = encodeURIComponent;

  async function poll() {
    if (state.busy) return;
    state.busy = true;
    try {
      state.runs = await getJSON("/v1/runs");
      renderRunPicker();
      if (state.run) {
        const base = `/v1/runs/${enc(state.run)}`;
        const q = state.lastStep === null ? `limit=${FIRST_LIMIT}`
          : `limit=${FIRST_LIMIT}&since_step=${state.lastStep}`;
        const [fresh, spectra] = await Promise.all([
          getJSON(`${base}/history?${q}&histograms=false`), getJSON(`${base}/spectra`)]);
        if (fresh.length && state.lastStep !== null && fresh[0].step <= state.lastStep) {
          state.history = [];                // the run restarted: start over
          state.peakSpectra = {};
        }
        state.history.push(...fresh);
        if (state.history.length > MAX_POINTS) state.history.splice(0, state.history.length - MAX_POINTS);
        if (state.history.length) state.lastStep = state.history[state.history.length - 1].step;
        state.spectra = spectra;
        state.latest = state.runs.find((r) => r.run === state.run) || state.history[state.history.length - 1] || null;
        render();
      }
      state.failures = 0;
      setStatus(state.run ? `Live · updated ${new Date().toLocaleTimeString()}`
        : "Waiting for the first publish…", false);
    } catch (err) {
      state.failures++;
      setStatus(`Cannot reach the server (${err.message}); retrying…`, true);
    } finally {
      state.busy = false;
    }
  }
  function setStatus(text, bad) {
    const s = $("status");
    s.textContent = text;
    s.classList.toggle("error", bad);
  }

  function renderRunPicker() {
    const sel = $("run");
    const names = state.runs.map((r) => r.run);
    const wanted = new URLSearchParams(location.search).get("run");
    if (!state.run && names.length) state.run = names.includes(wanted) ? wanted : names[0];
    const have = Array.from(sel.options).map((o) => o.value);
    const want = names.length ? names : [""];
    if (have.join("\n") !== want.join("\n")) {
      sel.replaceChildren(...want.map((n) => el("option", { value: n }, n || "(waiting for a publish)")));
    }
    if (state.run) sel.value = state.run;
  }

  function selectRun(name) {
    if (name === state.run) return;
    state.run = name; state.history = []; state.lastStep = null; state.spectra = {};
    state.hover = {}; state.peakSpectra = {};
    $("groups").replaceChildren(); $("spectra").replaceChildren();
    const u = new URL(location.href);
    u.searchParams.set("run", name);
    history.replaceState(null, "", u);
    poll();
  }

  // ---------- rendering ----------
  function render() {
    renderHeader();
    renderAlerts();
    renderSpectra();
    renderGroups();
  }

  function sumValues(obj) {
    return Object.values(obj || {}).reduce((a, v) => a + (finite(v) ? v : 0), 0);
  }
  // Samples scored: every stream of a run scores the same training rows, so their sum would
  // count each row once per stream. Shown per stream (the largest when they differ), with each
  // stream's count on hover.
  function samplesPerStream(s) {
    const per = Object.entries(s.counters || {})
      .filter(([, c]) => c && finite(c.samples)).map(([k, c]) => [k, c.samples]);
    const counts = per.map(([, v]) => v);
    const max = counts.length ? Math.max(...counts) : NaN;
    const same = counts.every((v) => v === max);
    return { max, same, streams: per.length,
      title: per.map(([k, v]) => `${k}: ${fmtCount(v)}`).join(", ") };
  }
  function renderHeader() {
    const s = state.latest;
    if (!s) return;
    const samples = samplesPerStream(s);
    const dropped = sumValues(s.dropped), errors = sumValues(s.errors);
    $("f-step").textContent = fmtCount(s.step);
    $("f-samples").textContent = fmtCount(samples.max);
    $("f-samples").title = samples.title;
    $("f-samples-label").textContent = samples.streams <= 1 || samples.same
      ? "samples scored / stream" : "samples scored, max / stream";
    $("f-dropped").textContent = fmtCount(dropped);
    $("f-dropped").classList.toggle("bad", dropped > 0);
    $("f-errors").textContent = fmtCount(errors);
    $("f-errors").classList.toggle("bad", errors > 0);
    $("f-errors").title = Object.entries(s.errors || {}).map(([k, v]) => `${k}: ${v}`).join(", ");
    $("f-dropped").title = Object.entries(s.dropped || {}).map(([k, v]) => `${k}: ${v}`).join(", ");
    $("f-time").textContent = s.time ? new Date(s.time * 1000).toLocaleTimeString() : "–";
    document.title = `repwatch · ${s.run} · step ${s.step}` + (s.alerts && s.alerts.length ? ` · ${s.alerts.length} firing` : "");
  }

  function alertItem(a, resolvedAt) {
    const li = el("li", { class: resolvedAt === undefined ? a.severity : "resolved", "data-alert": a.name });
    const head = el("div", { class: "head" });
    head.append(el("span", { class: "name" }, a.name), el("span", { class: "sev" }, a.severity));
    const where = a.scope && a.scope !== "stream" ? `${a.scope} ${a.stream}` : `stream ${a.stream}`;
    head.append(el("span", { class: "where" }, where));
    head.append(el("span", { class: "since" }, resolvedAt === undefined
      ? `since step ${a.since_step}` : `steps ${a.since_step}–${resolvedAt}`));
    li.append(head);
    const p = el("p", { class: "desc" }, a.description + " ");
    if (/^https?:\/\//.test(a.runbook_url)) {
      const link = el("a", { href: a.runbook_url, target: "_blank", rel: "noopener" }, "runbook");
      p.append(link);
    } else if (/^docs\/runbooks\.md#/.test(a.runbook_url)) {
      // the default runbook base: the runbooks this server serves at ./runbooks
      const link = el("a", { href: "runbooks#" + a.runbook_url.split("#")[1], target: "_blank",
        rel: "noopener" }, "runbook");
      p.append(link);
    } else if (a.runbook_url) {
      p.append(document.createTextNode("Runbook: "), el("code", {}, a.runbook_url));
    }
    li.append(p);
    return li;
  }
  function renderAlerts() {
    const firing = (state.latest && state.latest.alerts) || [];
    const list = $("alerts");
    list.replaceChildren(...(firing.length ? firing.map((a) => alertItem(a))
      : [el("li", { class: "none" }, "No alert firing.")]));
    // recent: seen in history, not firing now; the last step it was seen firing
    const key = (a) => `${a.name}|${a.scope || "stream"}|${a.stream}|${a.since_step}`;
    const now = new Set(firing.map(key));
    const seen = new Map();
    for (const snap of state.history) {
      for (const a of snap.alerts || []) if (!now.has(key(a))) seen.set(key(a), [a, snap.step]);
    }
    const recent = Array.from(seen.values()).sort((x, y) => y[1] - x[1]).slice(0, 20);
    $("recent-wrap").hidden = recent.length === 0;
    $("recent").replaceChildren(...recent.map(([a, step]) => alertItem(a, step)));
  }

  // The peak the alerts use: the run tracker's effective_rank_peak (highest RankMe once the
  // window is full and training is past peak_warmup), carried by each snapshot. Its step is
  // the first snapshot in the page's history whose RankMe equals it (null when that snapshot
  // is older than the history the page holds). null before the warm-up has passed.
  const sameRank = (a, b) => finite(a) && finite(b) && Math.abs(a - b) <= 1e-9 * Math.max(1, Math.abs(b));
  function alertPeak(name) {
    const cur = state.latest && state.latest.streams && state.latest.streams[name];
    const value = cur ? cur.effective_rank_peak : null;
    if (!finite(value)) return null;
    let step = null;
    for (const snap of state.history) {
      const v = snap.streams && snap.streams[name];
      if (v && sameRank(v.effective_rank, value)) { step = snap.step; break; }
    }
    return { value, step };
  }
  // Eigenvalue shares λᵢ/Σλ: spectra of different scale (the embeddings grow or shrink during
  // training) are compared by their shape, which is what the effective rank measures; a
  // spectrum of higher rank cannot then lie entirely below one of lower rank.
  function shares(eig) {
    const total = eig.reduce((a, v) => a + (finite(v) && v > 0 ? v : 0), 0);
    return eig.map((v) => (finite(v) && total > 0 ? Math.max(v, 0) / total : null));
  }
  function renderSpectra() {
    const box = $("spectra");
    const names = Object.keys(state.spectra).sort();
    if (!names.length) {
      box.replaceChildren(el("p", { class: "empty" }, "No spectrum published yet."));
      return;
    }
    box.querySelectorAll(".empty").forEach((e) => e.remove());
    for (const name of names) {
      const sp = state.spectra[name];
      const id = `spectrum:${name}`;
      const c = card(box, id, `${name}`, "eigenvalue share λᵢ/Σλ, log scale");
      const peak = alertPeak(name);
      // the alert's peak spectrum: the server's peak when it is that one (the server keeps the
      // highest rank in its history, which can be a random init's before the warm-up), else a
      // spectrum this page saw while it was the current one and the peak
      if (peak && sameRank(sp.effective_rank, peak.value)) {
        state.peakSpectra[name] = { step: sp.step, effective_rank: sp.effective_rank,
          eigenvalues: sp.eigenvalues };
      }
      let peakSpec = null;
      if (peak && sp.peak && sameRank(sp.peak.effective_rank, peak.value)) peakSpec = sp.peak;
      else if (peak && state.peakSpectra[name] && sameRank(state.peakSpectra[name].effective_rank, peak.value)) {
        peakSpec = state.peakSpectra[name];
      }
      const now = shares(sp.eigenvalues);
      const then = peakSpec ? shares(peakSpec.eigenvalues) : [];
      const top = Math.max(0, ...now.filter(finite), ...then.filter(finite));
      const floor = top > 0 ? top * 1e-9 : 1e-12;
      const clamp = (v) => (finite(v) ? Math.max(v, floor) : null);
      const series = [{ name: `now, step ${sp.step} (rank ${fmt(sp.effective_rank)})`, color: color(0),
        xs: now.map((_, i) => i + 1), ys: now.map(clamp) }];
      if (peakSpec) {
        series.push({ name: `alert's peak, step ${peakSpec.step} (rank ${fmt(peakSpec.effective_rank)})`,
          color: color(1), dash: true, xs: then.map((_, i) => i + 1), ys: then.map(clamp) });
      }
      drawChart(c.querySelector("svg"), { id, series, logY: true, xLabel: "index" });
      c.querySelector(".now").textContent = `d = ${sp.eigenvalues.length}`;
      legend(c, series);
      let note = null;
      if (!peak) {
        note = "no peak yet: the alerts' peak is counted once the window is full and training "
          + "is past the warm-up (peak_warmup)";
      } else if (!peakSpec) {
        note = `alert's peak: rank ${fmt(peak.value)}`
          + (peak.step !== null ? ` at step ${peak.step}` : " (before this page's history)")
          + "; its spectrum is not among those the server keeps";
      }
      if (note) c.querySelector(".legend").append(el("span", { class: "note" }, note));
    }
  }

  function ordered(scope, keys) {
    const prio = PRIMARY[scope];
    const first = prio.filter((k) => keys.has(k));
    const rest = Array.from(keys).filter((k) => !prio.includes(k)).sort();
    return [first, rest];
  }
  function renderGroups() {
    const root = $("groups");
    const steps = state.history.map((s) => s.step);
    for (const [scope, field, title] of SCOPES) {
      const entities = new Map();          // name -> Set(signal)
      for (const snap of state.history) {
        const group = scope === "run" ? (Object.keys(snap.run_signals || {}).length ? { model: snap.run_signals } : {}) : snap[field] || {};
        for (const [name, vals] of Object.entries(group)) {
          if (!entities.has(name)) entities.set(name, new Set());
          for (const [k, v] of Object.entries(vals)) if (v === null || typeof v === "number") entities.get(name).add(k);
        }
      }
      for (const name of Array.from(entities.keys()).sort()) {
        const sid = `${scope}:${name}`;
        let sec = root.querySelector(`[data-group="${CSS.escape(sid)}"]`);
        if (!sec) {
          sec = el("section", { class: "panel", "data-group": sid });
          const h = el("h2");
          h.append(document.createTextNode(`${title} `), el("code", {}, name));
          const grid = el("div", { class: "grid primary" });
          const more = el("details", { class: "more" });
          more.append(el("summary", {}, "more signals"), el("div", { class: "grid secondary" }));
          sec.append(h, grid, more);
          root.append(sec);
        }
        const [first, rest] = ordered(scope, entities.get(name));
        const markers = [];
        for (const snap of state.history) {
          for (const a of snap.alerts || []) {
            if ((a.scope || "stream") === scope && a.stream === name && a.since_step === snap.step) {
              markers.push({ x: a.since_step, cls: a.severity, label: `${a.name} fired at step ${a.since_step}` });
            }
          }
        }
        const more = sec.querySelector("details.more");
        more.hidden = rest.length === 0;
        const draw = (grid, signal) => {
          const id = `${sid}:${signal}`;
          const c = card(grid, id, LABELS[signal] || signal, signal);
          const ys = state.history.map((s) => {
            const g = scope === "run" ? s.run_signals : (s[field] || {})[name];
            const v = g ? g[signal] : null;
            return typeof v === "number" ? v : null;
          });
          const series = [{ name, color: color(0), xs: steps, ys }];
          drawChart(c.querySelector("svg"), { id, series, markers, xLabel: "step",
            ...yReference(signal) });
          c.querySelector(".now").textContent = fmt(ys[ys.length - 1]);
        };
        for (const s of first) draw(sec.querySelector(".grid.primary"), s);
        if (more.open || !first.length) {
          for (const s of rest) draw(sec.querySelector(first.length ? ".grid.secondary" : ".grid.primary"), s);
        }
      }
    }
  }

  // ---------- theme ----------
  function render0() { if (state.run && state.history.length) render(); }

  document.addEventListener("DOMContentLoaded", () => {
    initTheme(render0, true);
    $("run").addEventListener("change", (ev) => selectRun(ev.target.value));
    document.addEventListener("toggle", (ev) => { if (ev.target.matches && ev.target.matches("details.more")) render0(); }, true);
    let resizeTimer = null;
    window.addEventListener("resize", () => { clearTimeout(resizeTimer); resizeTimer = setTimeout(render0, 150); });
    poll();
    state.timer = setInterval(poll, POLL_MS);
  });
})();
