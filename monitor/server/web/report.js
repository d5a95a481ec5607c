// repwatch report: the offline page of `repwatch report LOG.jsonl [...]` (monitor/cli/report.py).
// Not loaded on its own: report.py inlines it into one page, inside one function scope, right
// after the dashboard's own drawing code, cut from app.js (its "signals" to "data" sections:
// LABELS, PRIMARY, yReference, fmt, el, svgEl, finite, drawChart, card, legend, color,
// initTheme), so the charts, their labels and their order are the dashboard's.
// It draws the data embedded in the page (#repwatch-data): no fetch, no polling, no network.

  const DATA = JSON.parse(document.getElementById("repwatch-data").textContent);
  const RUNS = DATA.runs;
  const COMPARE = RUNS.length > 1;
  const SCOPE_TITLES = { stream: "Stream", layer: "Layer (plasticity)", param: "Parameter", run: "Model" };
  const SCOPE_ORDER = ["stream", "layer", "param", "run"];
  const runColor = (i) => color(COMPARE ? i : 0);

  // ---------- header ----------
  function renderHeader() {
    $("title").textContent = DATA.title;
    document.title = DATA.title;
    $("generated").textContent = `generated ${DATA.generated} by repwatch ${DATA.version}`;
    const rows = RUNS.map((r, i) => {
      const tr = el("tr", { "data-run": r.label });
      const sw = el("i", { class: "swatch" });
      sw.style.borderTopColor = runColor(i);
      const name = el("td");
      name.append(sw, document.createTextNode(r.label));
      const firing = r.alerts.filter((a) => a.resolved_step === null).length;
      const thinned = r.shown < r.publishes ? ` (${fmtCount(r.shown)} drawn)` : "";
      tr.append(name, el("td", {}, r.file),
        el("td", {}, `${fmtCount(r.first_step)}–${fmtCount(r.last_step)}`),
        el("td", {}, fmtCount(r.publishes) + thinned),
        el("td", { title: pairs(r.samples_by) }, fmtCount(r.samples)),
        el("td", { class: r.errors > 0 ? "bad" : "", title: pairs(r.errors_by) }, fmtCount(r.errors)),
        el("td", { class: r.dropped > 0 ? "bad" : "", title: pairs(r.dropped_by) }, fmtCount(r.dropped)),
        el("td", { class: firing ? "bad" : "" }, `${r.alerts.length}` + (firing ? ` (${firing} firing at the end)` : "")));
      return tr;
    });
    $("runs-body").replaceChildren(...rows);
    const notes = [];
    for (const r of RUNS) {
      for (const x of r.resumes) {
        notes.push(`${r.label}: resumed at step ${x.step} (it had reached step ${x.from}); the abandoned steps are left out`);
      }
    }
    $("run-notes").replaceChildren(...notes.map((t) => el("li", {}, t)));
  }
  function pairs(obj) {
    return Object.entries(obj || {}).map(([k, v]) => `${k}: ${v}`).join(", ");
  }

  // ---------- alerts ----------
  function alertItem(a, run) {
    const li = el("li", { class: a.resolved_step === null ? a.severity : `${a.severity} resolved-ok`,
      "data-alert": a.name, "data-run": run.label });
    const head = el("div", { class: "head" });
    head.append(el("span", { class: "name" }, a.name), el("span", { class: "sev" }, a.severity));
    const where = a.scope && a.scope !== "stream" ? `${a.scope} ${a.stream}` : `stream ${a.stream}`;
    head.append(el("span", { class: "where" }, (COMPARE ? `${run.label} · ` : "") + where));
    head.append(el("span", { class: "since" }, a.resolved_step === null
      ? `since step ${a.since_step}, still firing at the end (step ${a.last_step})`
      : `steps ${a.since_step}–${a.resolved_step} (resolved)`));
    li.append(head);
    const p = el("p", { class: "desc" }, a.description + " ");
    if (/^https?:\/\//.test(a.runbook_url)) {
      p.append(el("a", { href: a.runbook_url, target: "_blank", rel: "noopener" }, "runbook"));
    } else if (a.runbook_url) {
      p.append(document.createTextNode("Runbook: "), el("code", {}, a.runbook_url));
    }
    li.append(p);
    return li;
  }
  function renderAlerts() {
    const items = [];
    RUNS.forEach((r) => r.alerts.forEach((a) => items.push([a, r])));
    items.sort((x, y) => x[0].since_step - y[0].since_step);
    $("alerts").replaceChildren(...(items.length ? items.map(([a, r]) => alertItem(a, r))
      : [el("li", { class: "none" }, "No alert fired in this history.")]));
  }

  // ---------- spectra ----------
  function renderSpectra() {
    const box = $("spectra");
    const names = new Set();
    RUNS.forEach((r) => Object.keys(r.spectra).forEach((n) => names.add(n)));
    if (!names.size) {
      box.replaceChildren(el("p", { class: "empty", id: "no-spectra" },
        "No eigenvalue spectra in these logs (Monitor(log_path=...) writes each publish's "
        + "Snapshot.to_dict(), which leaves them out)."));
      return;
    }
    for (const name of Array.from(names).sort()) {
      const id = `spectrum:${name}`;
      const c = card(box, id, name, "eigenvalues, log scale");
      const series = [];
      let top = 0, d = 0;
      RUNS.forEach((r, i) => (r.spectra[name] || []).forEach((sp) => {
        for (const v of sp.eigenvalues) if (finite(v) && v > top) top = v;
        d = Math.max(d, sp.eigenvalues.length);
      }));
      const floor = top > 0 ? top * 1e-9 : 1e-12;
      const clamp = (v) => (finite(v) ? Math.max(v, floor) : null);
      RUNS.forEach((r, i) => (r.spectra[name] || []).forEach((sp, k) => {
        // one run: first, peak and last in three colours; several: each run's colour, its
        // peak dashed
        const col = COMPARE ? runColor(i) : color({ last: 0, peak: 1, first: 2 }[sp.what] ?? 3);
        if (COMPARE && sp.what === "first") return;
        series.push({ name: `${COMPARE ? r.label + " " : ""}${sp.what}, step ${sp.step} (rank ${fmt(sp.effective_rank)})`,
          color: col, dash: sp.what === "peak", xs: sp.eigenvalues.map((_, j) => j + 1),
          ys: sp.eigenvalues.map(clamp) });
      }));
      if (!series.length) continue;
      drawChart(c.querySelector("svg"), { id, series, logY: true, xLabel: "index" });
      c.querySelector(".now").textContent = `d = ${d}`;
      legend(c, series);
    }
  }

  // ---------- charts over the run ----------
  function entities(scope) {
    const out = new Map();                 // name -> Set(signal), in the runs' order
    for (const r of RUNS) {
      for (const [name, sigs] of Object.entries(r.groups[scope] || {})) {
        if (!out.has(name)) out.set(name, new Set());
        for (const k of Object.keys(sigs)) out.get(name).add(k);
      }
    }
    return out;
  }
  function markersFor(scope, name) {
    const out = [];
    RUNS.forEach((r) => {
      for (const a of r.alerts) {
        if ((a.scope || "stream") !== scope || a.stream !== name) continue;
        const who = COMPARE ? ` (${r.label})` : "";
        out.push({ x: a.since_step, cls: a.severity, label: `${a.name} fired at step ${a.since_step}${who}` });
        if (a.resolved_step !== null) {
          out.push({ x: a.resolved_step, cls: "resolved", label: `${a.name} resolved at step ${a.resolved_step}${who}` });
        }
      }
    });
    return out;
  }
  function drawSignal(grid, scope, name, signal, markers) {
    const id = `${scope}:${name}:${signal}`;
    const c = card(grid, id, LABELS[signal] || signal, signal);
    const series = [];
    const last = [];
    RUNS.forEach((r, i) => {
      const ys = ((r.groups[scope] || {})[name] || {})[signal];
      if (!ys) return;
      series.push({ name: COMPARE ? r.label : name, color: runColor(i), xs: r.steps, ys });
      last.push((COMPARE ? `${r.label} ` : "") + fmt(ys[ys.length - 1]));
    });
    drawChart(c.querySelector("svg"), { id, series, markers, xLabel: "step" });
    c.querySelector(".now").textContent = last.join(" · ");
    if (COMPARE) legend(c, series);
  }
  function renderGroups() {
    const root = $("groups");
    for (const scope of SCOPE_ORDER) {
      const ents = entities(scope);
      for (const name of Array.from(ents.keys()).sort()) {
        const sid = `${scope}:${name}`;
        let sec = root.querySelector(`[data-group="${CSS.escape(sid)}"]`);
        if (!sec) {
          sec = el("section", { class: "panel", "data-group": sid });
          const h = el("h2");
          h.append(document.createTextNode(`${SCOPE_TITLES[scope]} `), el("code", {}, name));
          const more = el("details", { class: "more" });
          more.append(el("summary", {}, "more signals"), el("div", { class: "grid secondary" }));
          sec.append(h, el("div", { class: "grid primary" }), more);
          root.append(sec);
        }
        const keys = ents.get(name);
        const first = PRIMARY[scope].filter((k) => keys.has(k));
        const rest = Array.from(keys).filter((k) => !PRIMARY[scope].includes(k)).sort();
        const markers = markersFor(scope, name);
        const more = sec.querySelector("details.more");
        more.hidden = rest.length === 0 || first.length === 0;
        for (const s of first) drawSignal(sec.querySelector(".grid.primary"), scope, name, s, markers);
        // like the dashboard: the rest are drawn when opened (or at once with no primary one)
        if (more.open || !first.length) {
          for (const s of rest) drawSignal(sec.querySelector(first.length ? ".grid.secondary" : ".grid.primary"), scope, name, s, markers);
        }
      }
    }
  }

  function render() {
    renderSpectra();
    renderGroups();
  }

  function start() {
    initTheme(render, false);
    renderHeader();
    renderAlerts();
    render();
    document.addEventListener("toggle", (ev) => {
      if (ev.target.matches && ev.target.matches("details.more")) render();
    }, true);
    let resizeTimer = null;
    window.addEventListener("resize", () => { clearTimeout(resizeTimer); resizeTimer = setTimeout(render, 150); });
    document.body.dataset.rendered = "true";
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
