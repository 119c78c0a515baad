// autounet report.html: training curves, the case table and the case viewer.
// Data comes from the JSON block #report-data; it is only ever put into the page as text
// (textContent, canvas), never as markup.
"use strict";
(function () {
  const DATA = JSON.parse(document.getElementById("report-data").textContent);
  const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];
  const ERR = { fp: [255, 0, 255], fn: [0, 230, 255], wrong: [255, 230, 0] }; // apart from the class colours

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    if (attrs) for (const k of Object.keys(attrs)) node.setAttribute(k, attrs[k]);
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }
  function fmt(x, digits) {
    return x === null || x === undefined || !isFinite(x) ? "-" : Number(x).toFixed(digits);
  }

  // ---------------------------------------------------------------- training curves
  const PANELS = [
    { key: "loss", title: "Loss (train solid, validation dashed)" },
    { key: "dice", title: "Pseudo-Dice (validation patches, mean of classes)" },
    { key: "ema", title: "EMA of the pseudo-Dice (picks checkpoint_best)" },
    { key: "lr", title: "Learning rate", log: true },
  ];

  function niceTicks(lo, hi, n) {
    if (!(hi > lo)) { hi = lo + 1; }
    const raw = (hi - lo) / n;
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw) || raw;
    const out = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(Number(v.toPrecision(12)));
    return out;
  }

  function drawPanel(canvas, panel, series, hidden, maxEpoch) {
    const dpr = window.devicePixelRatio || 1;
    const w = canvas.clientWidth || 420, h = canvas.clientHeight || 240;
    canvas.width = Math.round(w * dpr); canvas.height = Math.round(h * dpr);
    const g = canvas.getContext("2d");
    g.setTransform(dpr, 0, 0, dpr, 0, 0);
    g.clearRect(0, 0, w, h);
    const left = 58, right = 10, top = 24, bottom = 30;
    const lines = [];
    series.forEach((s, i) => {
      if (hidden.has(i)) return;
      const parts = panel.key === "loss" ? [[s.train_loss, []], [s.val_loss, [5, 3]]] : [[s[panel.key], []]];
      for (const [ys, dash] of parts) {
        const pts = [];
        s.epochs.forEach((x, j) => {
          const y = ys[j];
          if (y !== null && isFinite(y) && (!panel.log || y > 0)) pts.push([x, panel.log ? Math.log10(y) : y]);
        });
        if (pts.length) lines.push({ pts, dash, colour: s.colour });
      }
    });
    g.fillStyle = "#1d232b"; g.font = "12px system-ui, sans-serif";
    g.fillText(panel.title, left, 15);
    const all = lines.flatMap((l) => l.pts.map((p) => p[1]));
    if (!all.length) { g.fillStyle = "#5b6673"; g.fillText("no values", left + 10, top + 30); return; }
    let lo = Math.min(...all), hi = Math.max(...all);
    if (hi - lo < 1e-12) { lo -= 0.5; hi += 0.5; }
    const pad = (hi - lo) * 0.05; lo -= pad; hi += pad;
    const x0 = 1, x1 = Math.max(2, maxEpoch);
    const X = (x) => left + ((x - x0) / (x1 - x0)) * (w - left - right);
    const Y = (y) => top + (1 - (y - lo) / (hi - lo)) * (h - top - bottom);
    g.strokeStyle = "#d5dbe1"; g.lineWidth = 1; g.fillStyle = "#5b6673"; g.font = "11px system-ui, sans-serif";
    const yt = panel.log ? niceTicks(Math.floor(lo), Math.ceil(hi), 4).filter((v) => Number.isInteger(v)) : niceTicks(lo, hi, 4);
    for (const v of yt) {
      if (v < lo || v > hi) continue;
      g.beginPath(); g.moveTo(left, Y(v)); g.lineTo(w - right, Y(v)); g.stroke();
      const label = panel.log ? "1e" + v : String(Number(v.toPrecision(4)));
      g.fillText(label, 4, Y(v) + 4);
    }
    for (const v of niceTicks(x0, x1, 6)) {
      if (v < x0 || v > x1 || !Number.isInteger(v)) continue;
      g.beginPath(); g.moveTo(X(v), top); g.lineTo(X(v), h - bottom); g.stroke();
      g.fillText(String(v), X(v) - 4, h - bottom + 14);
    }
    g.fillText("epoch", w - right - 34, h - 4);
    g.strokeStyle = "#8a949e"; g.strokeRect(left, top, w - left - right, h - top - bottom);
    for (const l of lines) {
      g.strokeStyle = l.colour; g.lineWidth = 1.6; g.setLineDash(l.dash);
      g.beginPath();
      l.pts.forEach((p, j) => (j ? g.lineTo(X(p[0]), Y(p[1])) : g.moveTo(X(p[0]), Y(p[1]))));
      g.stroke();
      if (l.pts.length === 1) { g.fillStyle = l.colour; g.beginPath(); g.arc(X(l.pts[0][0]), Y(l.pts[0][1]), 3, 0, 7); g.fill(); }
    }
    g.setLineDash([]);
  }

  function setupCurves() {
    const series = DATA.curves;
    const legend = document.getElementById("curve-legend");
    const box = document.getElementById("curve-panels");
    if (!series.length) return;
    series.forEach((s, i) => { s.colour = PALETTE[i % PALETTE.length]; });
    const hidden = new Set();
    const maxEpoch = Math.max(...series.map((s) => Math.max(1, ...s.epochs)));
    const canvases = PANELS.map((p) => { const c = el("canvas", { "data-panel": p.key }); box.appendChild(c); return c; });
    const redraw = () => PANELS.forEach((p, i) => drawPanel(canvases[i], p, series, hidden, maxEpoch));
    series.forEach((s, i) => {
      const b = el("button", { type: "button", title: "show or hide this fold in every panel" });
      const sw = el("span", { class: "swatch" }); sw.style.background = s.colour;
      b.appendChild(sw); b.appendChild(document.createTextNode(s.label));
      b.addEventListener("click", () => {
        if (hidden.has(i)) hidden.delete(i); else hidden.add(i);
        b.classList.toggle("off", hidden.has(i)); redraw();
      });
      legend.appendChild(b);
    });
    redraw();
    window.addEventListener("resize", redraw);
  }

  // ---------------------------------------------------------------- case table
  const table = DATA.table;
  const columns = [
    { title: "#", get: (r) => r.rank, num: true, digits: 0 },
    { title: "case", get: (r) => r.case },
    { title: "fold", get: (r) => r.fold },
    { title: "mean Dice", get: (r) => r.mean, num: true, digits: 4 },
  ];
  for (const c of table.classes) {
    for (const [m, name, digits] of [["dice", "Dice", 4], ["hd95", "HD95 mm", 2], ["surface_dice", "NSD", 4]]) {
      columns.push({ title: name + " " + c.label, get: (r) => (r.scores[c.key] || {})[m], num: true, digits });
    }
  }
  columns.push({ title: "viewer", get: (r) => (r.view >= 0 ? "" : r.note), status: true });

  let sortState = { col: 3, dir: 1 };
  let selectedRow = null;

  function compare(a, b, col, dir) {
    const x = columns[col].get(a), y = columns[col].get(b);
    const missX = x === null || x === undefined || x === "", missY = y === null || y === undefined || y === "";
    if (missX || missY) return missX === missY ? a.rank - b.rank : missX ? 1 : -1; // missing values last
    if (x < y) return -dir;
    if (x > y) return dir;
    return a.rank - b.rank;
  }

  function renderTable() {
    const tbl = document.getElementById("case-table");
    tbl.textContent = "";
    const thead = el("thead"), tr = el("tr");
    columns.forEach((c, i) => {
      const th = el("th", { "data-col": String(i), class: c.num ? "num" : "" }, c.title);
      if (sortState.col === i) th.classList.add(sortState.dir > 0 ? "sorted-asc" : "sorted-desc");
      th.addEventListener("click", () => {
        sortState = { col: i, dir: sortState.col === i ? -sortState.dir : 1 };
        renderTable();
      });
      tr.appendChild(th);
    });
    thead.appendChild(tr); tbl.appendChild(thead);
    const tbody = el("tbody");
    const rows = table.rows.slice().sort((a, b) => compare(a, b, sortState.col, sortState.dir));
    for (const r of rows) {
      const row = el("tr", { "data-case": r.case });
      if (r.view >= 0) {
        row.classList.add("viewable");
        row.title = "show this case";
        row.addEventListener("click", () => openCase(r, row));
      }
      if (r === selectedRow) row.classList.add("selected");
      for (const c of columns) {
        const v = c.get(r);
        const td = el("td", { class: c.status ? "status" : c.num ? "num" : "" }, c.num ? fmt(v, c.digits) : v);
        if (c.status && r.view >= 0) td.textContent = "show";
        row.appendChild(td);
      }
      tbody.appendChild(row);
    }
    tbl.appendChild(tbody);
  }

  // ---------------------------------------------------------------- case viewer
  const cache = new Map();
  const state = { vol: null, axis: 0, channel: 0, slice: 0 };
  const canvas = document.getElementById("view");

  function decode(uri, channel) {
    return new Promise((resolve, reject) => {
      const img = new Image();
      img.onload = () => {
        const c = document.createElement("canvas");
        c.width = img.naturalWidth; c.height = img.naturalHeight;
        const g = c.getContext("2d", { willReadFrequently: true });
        g.drawImage(img, 0, 0);
        resolve({ data: g.getImageData(0, 0, c.width, c.height).data, width: c.width });
      };
      img.onerror = () => reject(new Error("a slice picture of this case could not be decoded"));
      img.src = uri;
    });
  }

  function unTile(pic, shape, cols, channel) {
    const [Z, Y, X] = shape, out = new Uint8Array(Z * Y * X);
    for (let z = 0; z < Z; z++) {
      const r0 = Math.floor(z / cols) * Y, c0 = (z % cols) * X;
      for (let y = 0; y < Y; y++) {
        const base = ((r0 + y) * pic.width + c0) * 4 + channel;
        const o = (z * Y + y) * X;
        for (let x = 0; x < X; x++) out[o + x] = pic.data[base + 4 * x];
      }
    }
    return out;
  }

  async function load(index) {
    if (cache.has(index)) return cache.get(index);
    const v = DATA.volumes[index];
    const pics = await Promise.all(v.images.map((u) => decode(u)));
    const lab = await decode(v.labels);
    const vol = {
      info: v,
      images: pics.map((p) => unTile(p, v.shape, v.cols, 0)),
      truth: unTile(lab, v.shape, v.cols, 0),
      pred: unTile(lab, v.shape, v.cols, 1),
    };
    vol.best = [0, 1, 2].map((axis) => busiest(vol, axis));
    cache.set(index, vol);
    return vol;
  }

  function busiest(vol, axis) {
    const [Z, Y, X] = vol.info.shape, n = vol.info.shape[axis], counts = new Float64Array(n);
    for (let z = 0; z < Z; z++) for (let y = 0; y < Y; y++) for (let x = 0; x < X; x++) {
      const i = (z * Y + y) * X + x;
      if (vol.truth[i] || vol.pred[i]) counts[axis === 0 ? z : axis === 1 ? y : x] += 1;
    }
    let best = Math.floor(n / 2);
    for (let k = 0; k < n; k++) if (counts[k] > counts[best]) best = k;
    return best;
  }

  // One slice as (rows, cols, index function); coronal and sagittal with axis 0 upwards.
  function plane(shape, axis, k) {
    const [Z, Y, X] = shape;
    if (axis === 0) return { rows: Y, cols: X, at: (r, c) => (k * Y + r) * X + c, sr: 1, sc: 2 };
    if (axis === 1) return { rows: Z, cols: X, at: (r, c) => ((Z - 1 - r) * Y + k) * X + c, sr: 0, sc: 2 };
    return { rows: Z, cols: Y, at: (r, c) => ((Z - 1 - r) * Y + c) * X + k, sr: 0, sc: 1 };
  }

  function hexRgb(h) { return [1, 3, 5].map((i) => parseInt(h.slice(i, i + 2), 16)); }
  const classColour = new Map(DATA.classes.map((c) => [c.value, hexRgb(c.colour)]));
  function colourOf(v) { return classColour.get(v) || hexRgb(PALETTE[(v - 1) % PALETTE.length]); }
  function lighter(rgb) { return rgb.map((x) => Math.round(x + (255 - x) * 0.55)); }

  function render() {
    const vol = state.vol;
    if (!vol) return;
    const info = vol.info, p = plane(info.shape, state.axis, state.slice);
    const sp = info.spacing, unit = Math.min(sp[p.sr], sp[p.sc]);
    const base = Math.max(1, Math.floor(480 / Math.max(p.rows * sp[p.sr] / unit, p.cols * sp[p.sc] / unit)));
    const sy = Math.max(1, Math.round(base * sp[p.sr] / unit)), sx = Math.max(1, Math.round(base * sp[p.sc] / unit));
    const W = p.cols * sx, H = p.rows * sy;
    canvas.width = W; canvas.height = H;
    const g = canvas.getContext("2d");
    const img = g.createImageData(W, H), px = img.data;
    const grey = vol.images[state.channel];
    const truthMode = document.getElementById("truth-mode").value;
    const predMode = document.getElementById("pred-mode").value;
    const errors = document.getElementById("errors").checked;
    const put = (r, c, rgb, alpha, edge) => {
      // edge: null fills the block; else [top, right, bottom, left] sides to draw
      const t = Math.max(1, Math.round(Math.min(sx, sy) / 4));
      for (let yy = 0; yy < sy; yy++) for (let xx = 0; xx < sx; xx++) {
        if (edge && !((edge[0] && yy < t) || (edge[2] && yy >= sy - t) || (edge[3] && xx < t) || (edge[1] && xx >= sx - t))) continue;
        const o = ((r * sy + yy) * W + c * sx + xx) * 4;
        for (let ch = 0; ch < 3; ch++) px[o + ch] = Math.round(px[o + ch] * (1 - alpha) + rgb[ch] * alpha);
      }
    };
    for (let r = 0; r < p.rows; r++) for (let c = 0; c < p.cols; c++) {
      const v = grey[p.at(r, c)];
      for (let yy = 0; yy < sy; yy++) {
        let o = ((r * sy + yy) * W + c * sx) * 4;
        for (let xx = 0; xx < sx; xx++, o += 4) { px[o] = v; px[o + 1] = v; px[o + 2] = v; px[o + 3] = 255; }
      }
    }
    const layer = (labels, mode, tone) => {
      if (mode === "off") return;
      for (let r = 0; r < p.rows; r++) for (let c = 0; c < p.cols; c++) {
        const v = labels[p.at(r, c)];
        if (!v) continue;
        const rgb = tone(colourOf(v));
        if (mode === "filled") { put(r, c, rgb, 0.45, null); continue; }
        const diff = (rr, cc) => rr < 0 || cc < 0 || rr >= p.rows || cc >= p.cols || labels[p.at(rr, cc)] !== v;
        const edge = [diff(r - 1, c), diff(r, c + 1), diff(r + 1, c), diff(r, c - 1)];
        if (edge.some(Boolean)) put(r, c, rgb, 1, edge);
      }
    };
    if (errors) {
      for (let r = 0; r < p.rows; r++) for (let c = 0; c < p.cols; c++) {
        const i = p.at(r, c), t = vol.truth[i], q = vol.pred[i];
        if (t === q) continue;
        put(r, c, !t ? ERR.fp : !q ? ERR.fn : ERR.wrong, 0.7, null);
      }
    }
    layer(vol.pred, predMode, (x) => x);
    layer(vol.truth, truthMode, lighter);
    g.putImageData(img, 0, 0);
    const n = info.shape[state.axis];
    document.getElementById("slice-label").textContent = "slice " + (state.slice + 1) + " / " + n;
  }

  function setSlice(k) {
    if (!state.vol) return;
    const n = state.vol.info.shape[state.axis];
    state.slice = Math.min(n - 1, Math.max(0, k));
    document.getElementById("slice").value = String(state.slice);
    render();
  }

  function setAxis(axis) {
    state.axis = axis;
    const slider = document.getElementById("slice");
    slider.max = String(state.vol.info.shape[axis] - 1);
    setSlice(state.vol.best[axis]);
  }

  async function openCase(row, tr) {
    selectedRow = row;
    document.querySelectorAll("#case-table tr.selected").forEach((x) => x.classList.remove("selected"));
    if (tr) tr.classList.add("selected");
    const viewer = document.getElementById("viewer");
    viewer.hidden = false;
    document.getElementById("viewer-title").textContent = row.case + " (fold " + row.fold + ", mean Dice " + fmt(row.mean, 4) + ")";
    const status = document.getElementById("viewer-status");
    status.textContent = "loading ...";
    try {
      state.vol = await load(row.view);
    } catch (e) {
      state.vol = null; status.textContent = e.message; return;
    }
    status.textContent = "";
    const info = state.vol.info;
    const sel = document.getElementById("channel");
    sel.textContent = "";
    info.images.forEach((_, i) => sel.appendChild(el("option", { value: String(i) }, DATA.channels[i] ? i + ": " + DATA.channels[i] : String(i))));
    state.channel = 0;
    document.getElementById("window-label").textContent = "window " + info.windows[0] + (info.oriented ? "" : "; orientation as stored");
    setAxis(Number(document.getElementById("axis").value));
    viewer.setAttribute("data-case", row.case);
  }

  function setupViewer() {
    const slider = document.getElementById("slice");
    slider.addEventListener("input", () => setSlice(Number(slider.value)));
    document.getElementById("axis").addEventListener("change", (e) => state.vol && setAxis(Number(e.target.value)));
    document.getElementById("channel").addEventListener("change", (e) => {
      state.channel = Number(e.target.value);
      document.getElementById("window-label").textContent = "window " + state.vol.info.windows[state.channel];
      render();
    });
    for (const id of ["truth-mode", "pred-mode", "errors"]) document.getElementById(id).addEventListener("change", render);
    canvas.addEventListener("wheel", (e) => { if (!state.vol) return; e.preventDefault(); setSlice(state.slice + (e.deltaY > 0 ? 1 : -1)); }, { passive: false });
    document.addEventListener("keydown", (e) => {
      if (!state.vol || document.getElementById("viewer").hidden) return;
      const tag = (e.target && e.target.tagName) || "";
      if (tag === "SELECT" || tag === "INPUT" && e.target.type !== "range") return;
      if (e.key === "ArrowUp" || e.key === "ArrowRight") { e.preventDefault(); setSlice(state.slice + 1); }
      if (e.key === "ArrowDown" || e.key === "ArrowLeft") { e.preventDefault(); setSlice(state.slice - 1); }
    });
    const legend = document.getElementById("viewer-legend");
    for (const c of DATA.classes) {
      const s = el("span"), sw = el("span", { class: "swatch" }); sw.style.background = c.colour;
      s.appendChild(sw); s.appendChild(document.createTextNode(c.value + ": " + c.name)); legend.appendChild(s);
    }
    for (const [name, rgb] of [["false positive", ERR.fp], ["false negative", ERR.fn], ["wrong class", ERR.wrong]]) {
      const s = el("span"), sw = el("span", { class: "swatch" }); sw.style.background = "rgb(" + rgb.join(",") + ")";
      s.appendChild(sw); s.appendChild(document.createTextNode(name)); legend.appendChild(s);
    }
  }

  setupCurves();
  if (table.rows.length) { renderTable(); setupViewer(); }
})();
