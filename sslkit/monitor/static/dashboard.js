/* sslkit collapse monitor: renders runs (metrics.jsonl + alarms.jsonl) as inline SVG charts.
 * Data comes embedded in <script id="sslkit-data"> (a written HTML file) or is polled from data.json
 * (served mode). No external libraries; nothing is fetched except data.json from the serving host.
 * Every chart <svg> carries data-points="N": the number of points drawn in it.
 * Judgements come from Python (sslkit/monitor/dashboard.py): the shaded healthy / collapsed ranges are the
 * payload's `bands`, each run's badge is `run.verdict` and the summary colours are `run.health`; this file only
 * draws them, so a chart's red band and the badge always agree. */
(function () {
  "use strict";

  var COLORS = ["#2563eb", "#e11d48", "#059669", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#65a30d"];
  var MAX_POINTS = 1500;          // per series; longer series are thinned (every k-th point + last)
  var POLL_MS = 3000;
  var W = 470, H = 200, M = { l: 50, r: 12, t: 10, b: 24 };
  var SVGNS = "http://www.w3.org/2000/svg";
  var HIDDEN_KEYS = { step: 1, micro_step: 1, epoch: 1, time: 1, "monitor/bank_fill": 1 };

  // Chart specifications. include: values the y-range must show. Shaded bands come from the payload.
  var COLLAPSE = [
    { key: "monitor/embedding_std", title: "Embedding std (× √d)", include: [0, 1.1], hint: "≈1 healthy · 0 collapsed" },
    { key: "monitor/rankme_ratio", title: "RankMe / min(n, d)", include: [0, 0.1], hint: "effective rank ratio · low = dimensional collapse" },
    { key: "monitor/rankme", title: "RankMe (effective rank)", include: [0], hint: "exp entropy of singular values" },
    { key: "monitor/mean_cosine", title: "Mean pairwise cosine", include: [0, 1], hint: "≈0 healthy · 1 collapsed" },
    { key: "monitor/teacher_student_cos", title: "Teacher–student cosine", include: [0, 1], hint: "agreement of online and EMA target" }
  ];
  var OPTIM = [
    { key: "lr", title: "Learning rate", include: [0] },
    { key: "ema_tau", title: "EMA tau", hint: "teacher momentum" },
    { key: "samples_per_s", title: "Throughput", unit: "samples/s", include: [0] },
    { key: "grad_norm", title: "Gradient norm", include: [0] },
    { key: "update_to_weight", title: "Update / weight ratio", include: [0] },
    { key: "ema_updates", title: "EMA updates", include: [0] }
  ];
  // Probe statistics describe the encoder's pooled features of fixed crops (not the objective's embeddings):
  // spread and rank are measured around the features' own mean (sslkit/monitor/probe_stats.py).
  var PROBE_INFO = {
    "probe/spread": { title: "feature spread", include: [0], hint: "RMS distance to the mean / RMS norm · 0 = input ignored" },
    "probe/centred_rankme": { title: "RankMe of centred features", include: [0], hint: "directions the crops vary along · 1 = one" },
    "probe/centred_rankme_ratio": { title: "centred RankMe / min(n − 1, d)", include: [0, 1], hint: "centred effective rank ratio" },
    "probe/rankme": { title: "raw RankMe", include: [0], hint: "older runs: uncentred, ~1-2 even when healthy" },
    "probe/rankme_ratio": { title: "raw RankMe / min(n, d)", include: [0, 1], hint: "older runs: uncentred" },
    "probe/embedding_std": { title: "raw embedding std", include: [0], hint: "older runs: uncentred, not a collapse measure here" },
    "probe/mean_cosine": { title: "raw mean cosine", include: [0, 1], hint: "older runs: uncentred, near 1 even when healthy" },
    "probe/drift_cos": { title: "drift (cosine to previous probe)", include: [0, 1], hint: "1 = probe embeddings unchanged" }
  };

  // Task probe (sslkit/monitor/task_probe.py): Dice of a voxel classifier on the frozen encoder's features, with the
  // two lines measured once at step 0: the randomly initialised encoder and the input intensities alone.
  var PROBE_REFS = [
    { key: "task_probe/ref_random/dice_mean", label: "random init", color: "#6b7280" },
    { key: "task_probe/ref_intensity/dice_mean", label: "intensity only", color: "#b45309" }
  ];

  var state = { data: null, mode: "overlay", hidden: {}, sig: "", live: false };

  // ------------------------------------------------------------------------------------ helpers
  function el(tag, attrs, text) {
    var e = document.createElement(tag);
    for (var k in attrs || {}) e.setAttribute(k, attrs[k]);
    if (text != null) e.textContent = text;
    return e;
  }
  function sv(tag, attrs, text) {
    var e = document.createElementNS(SVGNS, tag);
    for (var k in attrs || {}) e.setAttribute(k, attrs[k]);
    if (text != null) e.textContent = text;
    return e;
  }
  function isNum(v) { return typeof v === "number" && isFinite(v); }
  function fmt(v, digits) {
    if (!isNum(v)) return v == null ? "–" : String(v);
    var a = Math.abs(v);
    if (a === 0) return "0";
    if (a >= 1e5) return (v / 1000).toFixed(0) + "k";
    if (a >= 1e4) return (v / 1000).toFixed(1) + "k";
    if (a < 1e-3) return v.toExponential(1);
    if (a >= 100) return v.toFixed(0);
    return String(parseFloat(v.toPrecision(digits || 3)));
  }
  function niceTicks(lo, hi, n) {
    if (!(hi > lo)) { hi = lo + 1; }
    var span = hi - lo, raw = span / Math.max(1, n), mag = Math.pow(10, Math.floor(Math.log10(raw)));
    var step = [1, 2, 2.5, 5, 10].map(function (m) { return m * mag; }).filter(function (s) { return s >= raw; })[0] || 10 * mag;
    var out = [], start = Math.ceil(lo / step - 1e-9) * step;
    for (var t = start; t <= hi + step * 1e-9; t += step) out.push(Math.abs(t) < step * 1e-9 ? 0 : t);
    return out;
  }
  function colorOf(i) { return COLORS[i % COLORS.length]; }
  function shortKey(k) { return k.replace(/^monitor\//, "").replace(/^probe\//, "probe "); }

  // ------------------------------------------------------------------------------------ data access
  function series(run, key) {
    var steps = run.columns.step || [], ys = run.columns[key];
    if (!ys) return null;
    var xs = [], vs = [];
    for (var i = 0; i < ys.length; i++) {
      if (isNum(ys[i]) && isNum(steps[i])) { xs.push(steps[i]); vs.push(ys[i]); }
    }
    if (xs.length > MAX_POINTS) {
      var k = Math.ceil(xs.length / MAX_POINTS), tx = [], tv = [];
      for (var j = 0; j < xs.length; j += k) { tx.push(xs[j]); tv.push(vs[j]); }
      if (tx[tx.length - 1] !== xs[xs.length - 1]) { tx.push(xs[xs.length - 1]); tv.push(vs[vs.length - 1]); }
      xs = tx; vs = tv;
    }
    return { xs: xs, ys: vs };
  }
  function lastValue(run, key) {
    var ys = run.columns[key];
    if (!ys) return null;
    for (var i = ys.length - 1; i >= 0; i--) if (ys[i] != null) return ys[i];
    return null;
  }
  function visibleRuns() {
    return state.data.runs.map(function (r, i) { return { run: r, idx: i }; })
      .filter(function (o) { return !state.hidden[o.run.path]; });
  }
  // Shaded ranges of a metric from the payload's bands: [{from, to, kind, label}], open ends -> +-Infinity.
  function bandsFor(key) {
    var b = ((state.data && state.data.bands) || []).filter(function (x) { return x.key === key; })[0];
    if (!b) return [];
    var out = [];
    var lo = b.healthy[0], hi = b.healthy[1];
    out.push({ from: lo == null ? -Infinity : lo, to: hi == null ? Infinity : hi, kind: "good", label: "healthy" });
    if (b.below != null) out.push({ from: -Infinity, to: b.below, kind: "bad", label: "collapsed" });
    if (b.above != null) out.push({ from: b.above, to: Infinity, kind: "bad", label: "collapsed" });
    return out;
  }
  function firstValue(run, key) {
    var ys = run.columns[key];
    if (!ys) return null;
    for (var i = 0; i < ys.length; i++) if (isNum(ys[i])) return ys[i];
    return null;
  }
  // Reference lines of a chart: [{label, value, color}] per drawn run (spec.refs names their metric keys).
  function referencesFor(spec, runs) {
    var out = [];
    (spec.refs || []).forEach(function (ref) {
      runs.forEach(function (o) {
        var v = firstValue(o.run, ref.key);
        if (isNum(v)) out.push({ label: ref.label + (runs.length > 1 ? " · " + o.run.name : ""), value: v, color: ref.color });
      });
    });
    return out;
  }
  function alarmRulesFor(runs, key) {
    var out = [];
    runs.forEach(function (o) {
      (o.run.alarm_rules || []).forEach(function (r) {
        var k = r.metric;
        if (k === key || "monitor/" + k === key) out.push(r);
      });
    });
    return out;
  }

  // ------------------------------------------------------------------------------------ chart
  function chart(spec, runs, domainRuns) {
    var card = el("div", { "class": "chart", "data-metric": spec.key });
    var h = el("h4");
    h.appendChild(el("span", null, spec.title + (spec.unit ? " (" + spec.unit + ")" : "")));
    h.appendChild(el("span", { "class": "key" }, spec.key));
    card.appendChild(h);
    var latest = el("div", { "class": "latest" });
    card.appendChild(latest);

    var drawn = [], total = 0;
    runs.forEach(function (o) {
      var s = series(o.run, spec.key);
      if (!s || !s.xs.length) return;
      drawn.push({ s: s, color: colorOf(o.idx), run: o.run });
      total += s.xs.length;
      var lv = el("span", { style: "--c:" + colorOf(o.idx) }, fmt(s.ys[s.ys.length - 1], 4));
      lv.title = o.run.name;
      latest.appendChild(lv);
    });
    if (spec.hint) latest.appendChild(el("span", { "class": "hint", style: "--c:transparent" }, spec.hint));

    var svg = sv("svg", { viewBox: "0 0 " + W + " " + H, "data-points": String(total), "data-metric": spec.key,
      role: "img", "aria-label": spec.title });
    card.appendChild(svg);
    if (!drawn.length) {
      svg.appendChild(sv("text", { x: W / 2, y: H / 2, "text-anchor": "middle", "class": "empty" }, "no data yet"));
      return card;
    }

    // domains: over `domainRuns` when given (side by side: every run's chart shares one scale)
    var x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity;
    (domainRuns || runs).forEach(function (o) {
      var s = series(o.run, spec.key);
      if (!s || !s.xs.length) return;
      x0 = Math.min(x0, s.xs[0]); x1 = Math.max(x1, s.xs[s.xs.length - 1]);
      s.ys.forEach(function (v) { if (v < y0) y0 = v; if (v > y1) y1 = v; });
    });
    (spec.include || []).forEach(function (v) { y0 = Math.min(y0, v); y1 = Math.max(y1, v); });
    var rules = alarmRulesFor(runs, spec.key);
    rules.forEach(function (r) {
      [r.below, r.above].forEach(function (t) { if (isNum(t)) { y0 = Math.min(y0, t); y1 = Math.max(y1, t); } });
    });
    var refs = referencesFor(spec, runs);
    refs.forEach(function (r) { y0 = Math.min(y0, r.value); y1 = Math.max(y1, r.value); });
    if (y1 - y0 < 1e-12) { var pad0 = Math.abs(y0) * 0.1 || 1; y0 -= pad0; y1 += pad0; }
    var pad = (y1 - y0) * 0.06;
    var yt = niceTicks(y0 - (y0 === 0 ? 0 : pad), y1 + pad, 4);
    y0 = Math.min(y0 - (y0 === 0 ? 0 : pad), yt[0]); y1 = Math.max(y1 + pad, yt[yt.length - 1]);
    if (x1 === x0) { x0 -= 1; x1 += 1; }
    var pw = W - M.l - M.r, ph = H - M.t - M.b;
    function X(v) { return M.l + (v - x0) / (x1 - x0) * pw; }
    function Y(v) { return M.t + (1 - (v - y0) / (y1 - y0)) * ph; }
    var clipId = "clip-" + Math.random().toString(36).slice(2);
    var defs = sv("defs");
    var cp = sv("clipPath", { id: clipId });
    cp.appendChild(sv("rect", { x: M.l, y: M.t, width: pw, height: ph }));
    defs.appendChild(cp);
    svg.appendChild(defs);

    // healthy / collapsed bands
    bandsFor(spec.key).forEach(function (b) {
      var lo = Math.max(b.from, y0), hi = Math.min(b.to, y1);
      if (hi <= lo) return;
      var good = b.kind === "good";
      svg.appendChild(sv("rect", { x: M.l, y: Y(hi), width: pw, height: Y(lo) - Y(hi),
        fill: good ? "#16a34a" : "#dc2626", "fill-opacity": good ? 0.08 : 0.09, "class": "band band-" + b.kind }));
      if (Y(lo) - Y(hi) > 11) {
        svg.appendChild(sv("text", { x: W - M.r - 4, y: Y(hi) + 10, "text-anchor": "end", "class": "band-label",
          fill: good ? "#15803d" : "#b91c1c", style: "fill:" + (good ? "#15803d" : "#b91c1c") }, b.label));
      }
    });
    // grid + axes
    yt.forEach(function (t) {
      svg.appendChild(sv("line", { x1: M.l, x2: W - M.r, y1: Y(t), y2: Y(t), stroke: "#eef0f4" }));
      svg.appendChild(sv("text", { x: M.l - 6, y: Y(t) + 3, "text-anchor": "end" }, fmt(t)));
    });
    niceTicks(x0, x1, 6).forEach(function (t) {
      if (t < x0 || t > x1) return;
      svg.appendChild(sv("line", { x1: X(t), x2: X(t), y1: H - M.b, y2: H - M.b + 4, stroke: "#cbd5e1" }));
      svg.appendChild(sv("text", { x: X(t), y: H - M.b + 15, "text-anchor": "middle" }, fmt(t)));
    });
    svg.appendChild(sv("line", { x1: M.l, x2: W - M.r, y1: H - M.b, y2: H - M.b, stroke: "#cbd5e1" }));

    // alarm thresholds
    rules.forEach(function (r) {
      [["below", r.below], ["above", r.above]].forEach(function (p) {
        if (!isNum(p[1])) return;
        svg.appendChild(sv("line", { x1: M.l, x2: W - M.r, y1: Y(p[1]), y2: Y(p[1]), stroke: "#dc2626",
          "stroke-dasharray": "2 3", "stroke-opacity": 0.7, "class": "threshold" }));
        svg.appendChild(sv("text", { x: M.l + 4, y: Y(p[1]) - 3, style: "fill:#b91c1c" },
          "alarm " + (p[0] === "below" ? "<" : ">") + " " + fmt(p[1])));
      });
    });

    // reference lines (task probe: random-init and intensity-only Dice)
    refs.forEach(function (r, i) {
      svg.appendChild(sv("line", { x1: M.l, x2: W - M.r, y1: Y(r.value), y2: Y(r.value), stroke: r.color,
        "stroke-dasharray": "6 4", "stroke-width": 1.3, "class": "reference", "data-label": r.label }));
      svg.appendChild(sv("text", { x: W - M.r - 4, y: Y(r.value) - 3 - 11 * (i % 2), "text-anchor": "end",
        "class": "reference-label", style: "fill:" + r.color }, r.label + " " + fmt(r.value, 3)));
    });

    // lines
    var g = sv("g", { "clip-path": "url(#" + clipId + ")" });
    drawn.forEach(function (d) {
      var pts = d.s.xs.map(function (x, i) { return X(x).toFixed(1) + "," + Y(d.s.ys[i]).toFixed(1); });
      if (pts.length > 1) {
        g.appendChild(sv("polyline", { points: pts.join(" "), fill: "none", stroke: d.color, "stroke-width": 1.6,
          "stroke-linejoin": "round", "stroke-linecap": "round", "class": "series", "data-run": d.run.name,
          "data-points": String(pts.length) }));
      }
      if (pts.length < 60) {
        d.s.xs.forEach(function (x, i) {
          g.appendChild(sv("circle", { cx: X(x), cy: Y(d.s.ys[i]), r: pts.length > 1 ? 1.8 : 3, fill: d.color }));
        });
      }
    });
    svg.appendChild(g);

    // alarm markers
    runs.forEach(function (o) {
      (o.run.alarms || []).forEach(function (a) {
        if (!isNum(a.step) || a.step < x0 || a.step > x1) return;
        var own = a.metric === spec.key || "monitor/" + a.metric === spec.key ||
          (spec.key === "loss" && /^loss/.test(a.metric));
        var col = a.action === "warn" ? "#d97706" : "#dc2626";
        var mk = sv("g", { "class": "alarm-marker" + (own ? " own" : "") });
        mk.appendChild(sv("line", { x1: X(a.step), x2: X(a.step), y1: M.t, y2: H - M.b, stroke: col,
          "stroke-width": own ? 1.4 : 1, "stroke-dasharray": own ? "4 3" : "2 4", "stroke-opacity": own ? 0.9 : 0.45 }));
        var x = X(a.step), y = M.t;
        mk.appendChild(sv("path", { d: "M" + (x - 5) + "," + y + " L" + (x + 5) + "," + y + " L" + x + "," + (y + 7) + " Z",
          fill: col, stroke: colorOf(o.idx), "stroke-width": 0.8 }));
        mk.appendChild(sv("title", null, o.run.name + ": " + a.message));
        svg.appendChild(mk);
      });
    });

    hover(svg, drawn, X, x0, x1, pw, spec);
    return card;
  }

  function hover(svg, drawn, X, x0, x1, pw, spec) {
    var tip = document.getElementById("tooltip");
    var guide = sv("line", { y1: M.t, y2: H - M.b, stroke: "#94a3b8", "stroke-width": 1, visibility: "hidden" });
    svg.appendChild(guide);
    var hit = sv("rect", { x: M.l, y: M.t, width: pw, height: H - M.t - M.b, fill: "transparent" });
    svg.appendChild(hit);
    hit.addEventListener("mousemove", function (ev) {
      var r = svg.getBoundingClientRect();
      var step = x0 + ((ev.clientX - r.left) * W / r.width - M.l) / pw * (x1 - x0);
      var rows = [], best = null;
      drawn.forEach(function (d) {
        var i = nearest(d.s.xs, step);
        if (best === null || Math.abs(d.s.xs[i] - step) < Math.abs(best - step)) best = d.s.xs[i];
        rows.push('<div><i style="background:' + d.color + '"></i>' + esc(d.run.name) + ": <b>" + fmt(d.s.ys[i], 4) +
          "</b> <span style='color:#9ca3af'>@" + d.s.xs[i] + "</span></div>");
      });
      guide.setAttribute("x1", X(best)); guide.setAttribute("x2", X(best)); guide.setAttribute("visibility", "visible");
      tip.innerHTML = '<div class="t">' + esc(spec.title) + " · step " + best + "</div>" + rows.join("");
      tip.hidden = false;
      tip.style.left = Math.min(ev.clientX + 14, window.innerWidth - 300) + "px";
      tip.style.top = (ev.clientY + 14) + "px";
    });
    hit.addEventListener("mouseleave", function () { tip.hidden = true; guide.setAttribute("visibility", "hidden"); });
  }
  function nearest(xs, v) {
    var lo = 0, hi = xs.length - 1;
    while (hi - lo > 1) { var mid = (lo + hi) >> 1; if (xs[mid] < v) lo = mid; else hi = mid; }
    return Math.abs(xs[lo] - v) <= Math.abs(xs[hi] - v) ? lo : hi;
  }
  function esc(s) {
    return String(s).replace(/[&<>"']/g, function (c) {
      return { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c];
    });
  }

  // ------------------------------------------------------------------------------------ page parts
  function allKeys(runs) {
    var keys = {};
    runs.forEach(function (o) { Object.keys(o.run.columns).forEach(function (k) { keys[k] = 1; }); });
    return keys;
  }
  function sectionSpecs(runs) {
    var keys = allKeys(runs), used = {};
    function take(list) {
      return list.filter(function (s) { return keys[s.key]; }).map(function (s) { used[s.key] = 1; return s; });
    }
    var loss = [];
    if (keys.loss) loss.push({ key: "loss", title: "Total loss" });
    Object.keys(keys).sort().forEach(function (k) {
      if (/^loss\//.test(k)) loss.push({ key: k, title: "Loss · " + k.slice(5) });
    });
    loss.forEach(function (s) { used[s.key] = 1; });
    var collapse = take(COLLAPSE.slice());
    if (!collapse.length) collapse = COLLAPSE.slice(0, 4);   // show the empty collapse charts anyway
    var optim = take(OPTIM.slice());
    var probe = Object.keys(keys).sort().filter(function (k) { return /^probe\//.test(k); }).map(function (k) {
      used[k] = 1;
      var base = PROBE_INFO[k] || {};
      return { key: k, title: "Probe · " + (base.title || k.slice(6)), include: base.include, hint: base.hint };
    });
    var task = [];
    if (keys["task_probe/dice_mean"]) {
      task.push({ key: "task_probe/dice_mean", title: "Task probe · mean Dice", include: [0, 1], refs: PROBE_REFS,
        hint: "frozen features → voxel classifier · dashed: step-0 references" });
    }
    Object.keys(keys).sort().forEach(function (k) {
      if (/^task_probe\//.test(k)) {
        used[k] = 1;
        var m = /^task_probe\/dice\/(.+)$/.exec(k);
        if (m) task.push({ key: k, title: "Task probe · " + m[1], include: [0, 1],
          refs: PROBE_REFS.map(function (r) { return { key: r.key.replace("dice_mean", "dice/" + m[1]), label: r.label, color: r.color }; }) });
      }
    });
    var other = Object.keys(keys).sort().filter(function (k) { return !used[k] && !HIDDEN_KEYS[k]; })
      .map(function (k) { return { key: k, title: shortKey(k) }; });
    return [
      { title: "Task probe: does the encoder separate your labels?", specs: task },
      { title: "Loss per objective", specs: loss },
      { title: "Collapse metrics", specs: collapse },
      { title: "Probe set", specs: probe },
      { title: "Optimisation", specs: optim },
      { title: "Other metrics", specs: other, collapsed: true }
    ];
  }

  var HEALTH_CLASS = { collapsed: "bad", between: "warn", healthy: "good" };
  function classFor(run, key) { return HEALTH_CLASS[(run.health || {})[key]] || ""; }

  function renderSummary(runs) {
    var box = document.getElementById("summary");
    box.innerHTML = "";
    runs.forEach(function (o) {
      var r = o.run, verdict = r.verdict || { status: "waiting", label: "no data yet", reasons: [] };
      var watch = verdict.watch || [], notes = verdict.reasons.concat(watch);
      var card = el("div", { "class": "run-card", style: "--c:" + colorOf(o.idx), "data-run": r.name,
        "data-verdict": verdict.status });
      var h = el("h2");
      h.appendChild(el("span", null, r.name));
      var badge = el("span", { "class": "badge " + verdict.status + (watch.length ? " watch" : "") },
        verdict.label + (watch.length ? " · " + watch.length + " to watch" : ""));
      if (notes.length) badge.title = notes.join("\n");  // every metric outside its band
      h.appendChild(badge);
      card.appendChild(h);
      card.appendChild(el("div", { "class": "cfg", title: r.path }, r.config_name || r.path));
      var kv = el("div", { "class": "kv" });
      [["step", "step"], ["loss", "loss"], ["samples/s", "samples_per_s"], ["emb. std", "monitor/embedding_std"],
        ["rankme", "monitor/rankme"], ["mean cos", "monitor/mean_cosine"], ["probe spread", "probe/spread"],
        ["probe rank", "probe/centred_rankme"], ["probe Dice", "task_probe/dice_mean"]].forEach(function (p) {
        var v = lastValue(r, p[1]), d = el("div");
        if (v == null && /probe\//.test(p[1])) return;
        d.appendChild(el("span", { "class": "k" }, p[0]));
        d.appendChild(el("span", { "class": "v " + classFor(r, p[1]) }, fmt(v)));
        kv.appendChild(d);
      });
      card.appendChild(kv);
      if (notes.length) {
        var ul = el("ul", { "class": "reasons" });
        verdict.reasons.forEach(function (t) { ul.appendChild(el("li", null, t)); });
        watch.forEach(function (t) { ul.appendChild(el("li", { "class": "watch" }, t)); });
        card.appendChild(ul);
      }
      box.appendChild(card);
    });
  }

  function renderAlarms(runs) {
    var box = document.getElementById("alarms");
    box.innerHTML = "";
    var rows = [];
    runs.forEach(function (o) { (o.run.alarms || []).forEach(function (a) { rows.push({ a: a, o: o }); }); });
    box.appendChild(el("h3", null, "Alarms (" + rows.length + ")"));
    if (!rows.length) { box.appendChild(el("div", { "class": "none" }, "No alarms fired.")); return; }
    rows.sort(function (p, q) { return q.a.step - p.a.step; });
    var t = el("table", { "class": "alarms" });
    var hr = el("tr");
    ["step", "run", "metric", "value", "threshold", "action", "message"].forEach(function (c) { hr.appendChild(el("th", null, c)); });
    t.appendChild(hr);
    rows.forEach(function (p) {
      var tr = el("tr", { "class": "alarm-row", "data-step": String(p.a.step) });
      tr.appendChild(el("td", null, String(p.a.step)));
      var rn = el("td"); rn.appendChild(el("span", { style: "color:" + colorOf(p.o.idx) + ";font-weight:600" }, p.o.run.name));
      tr.appendChild(rn);
      tr.appendChild(el("td", null, p.a.metric));
      tr.appendChild(el("td", null, fmt(p.a.value)));
      tr.appendChild(el("td", null, fmt(p.a.threshold)));
      var ac = el("td"); ac.appendChild(el("span", { "class": "badge " + p.a.action }, p.a.action.replace(/_/g, " ")));
      tr.appendChild(ac);
      tr.appendChild(el("td", { "class": "msg" }, p.a.message || ""));
      t.appendChild(tr);
    });
    box.appendChild(t);
  }

  function renderLegend() {
    var box = document.getElementById("legend");
    box.innerHTML = "";
    state.data.runs.forEach(function (r, i) {
      var c = el("span", { "class": "chip" + (state.hidden[r.path] ? " off" : ""), title: r.path });
      var dot = el("span", { "class": "dot", style: "background:" + colorOf(i) });
      c.appendChild(dot);
      c.appendChild(document.createTextNode(r.name));
      c.addEventListener("click", function () { state.hidden[r.path] = !state.hidden[r.path]; render(); });
      box.appendChild(c);
    });
  }

  function renderSections(runs) {
    var box = document.getElementById("sections");
    box.innerHTML = "";
    sectionSpecs(runs).forEach(function (sec) {
      if (!sec.specs.length) return;
      var split = state.mode === "split" && runs.length > 1;
      var grid = el("div", { "class": "grid" });
      if (split) grid.style.gridTemplateColumns = "repeat(" + Math.min(runs.length, 4) + ", minmax(0, 1fr))";
      sec.specs.forEach(function (spec) {
        if (!split) grid.appendChild(chart(spec, runs));
        else runs.forEach(function (o) {
          var c = chart(spec, [o], runs);
          c.querySelector("h4 span").textContent = spec.title + " · " + o.run.name;
          grid.appendChild(c);
        });
      });
      if (sec.collapsed) {
        var d = el("details", { "class": "more" });
        d.appendChild(el("summary", null, sec.title + " (" + sec.specs.length + ")"));
        d.appendChild(grid);
        box.appendChild(d);
      } else {
        box.appendChild(el("div", { "class": "section-title" }, sec.title));
        box.appendChild(grid);
      }
    });
  }

  function render() {
    var app = document.getElementById("app");
    renderLegend();
    var runs = visibleRuns();
    if (!state.data.runs.length) {
      document.getElementById("summary").innerHTML = "";
      document.getElementById("alarms").innerHTML = "";
      document.getElementById("sections").innerHTML =
        '<div class="empty-state">No runs yet: waiting for metrics.jsonl in the watched folders.</div>';
      return;
    }
    renderSummary(runs);
    renderAlarms(runs);
    renderSections(runs);
    app.setAttribute("data-runs", String(state.data.runs.length));
  }

  function signature(d) {
    return d.runs.map(function (r) {
      return r.path + ":" + r.n_steps + ":" + (r.alarms || []).length + ":" + (r.verdict || {}).status;
    }).join("|");
  }

  function setStatus(text, cls) {
    var s = document.getElementById("status");
    s.textContent = text;
    s.className = "status " + (cls || "");
  }

  function accept(d) {
    state.data = d;
    var sig = signature(d);
    if (sig !== state.sig) { state.sig = sig; render(); }
  }

  function poll() {
    fetch("data.json", { cache: "no-store" })
      .then(function (r) { if (!r.ok) throw new Error("HTTP " + r.status); return r.json(); })
      .then(function (d) {
        accept(d);
        setStatus("live · updated " + new Date().toLocaleTimeString(), "live");
      })
      .catch(function (e) { setStatus("disconnected (" + e.message + ")", "err"); })
      .then(function () { setTimeout(poll, POLL_MS); });
  }

  function start() {
    if (location.hash === "#split") {            // link straight to one chart per run
      state.mode = "split";
      document.getElementById("mode").textContent = "overlay";
    }
    document.getElementById("mode").addEventListener("click", function () {
      state.mode = state.mode === "overlay" ? "split" : "overlay";
      this.textContent = state.mode === "overlay" ? "side by side" : "overlay";
      history.replaceState(null, "", state.mode === "split" ? "#split" : location.pathname + location.search);
      if (state.data) render();
    });
    var embedded = JSON.parse(document.getElementById("sslkit-data").textContent || "null");
    if (embedded) {
      accept(embedded);
      setStatus("snapshot · " + (embedded.generated || ""));
    } else {
      poll();
    }
  }

  start();
})();
