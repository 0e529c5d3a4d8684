// A small SVG line chart: one or more series of (step, value) points, axes with min/max labels.

const NS = "http://www.w3.org/2000/svg";
const W = 640, H = 260, PAD = { left: 56, right: 16, top: 28, bottom: 36 };
const COLORS = ["#1f6feb", "#d9480f", "#2b8a3e", "#862e9c"];

function el(name, attrs = {}, text) {
  const node = document.createElementNS(NS, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function fmt(v) {
  return Math.abs(v) >= 100 ? v.toFixed(0) : v.toPrecision(3);
}

export class LineChart {
  /** `series`: [{key, label}], drawn into a new <figure> appended to `parent`. */
  constructor(parent, title, series) {
    this.series = series.map((s, i) => ({ ...s, color: COLORS[i % COLORS.length], points: new Map() }));
    this.figure = document.createElement("figure");
    this.figure.className = "chart";
    const caption = document.createElement("figcaption");
    caption.textContent = title;
    this.svg = el("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title });
    this.figure.append(caption, this.svg);
    parent.append(this.figure);
    this.draw();
  }

  /** Add `values[key]` at `step` for every series that has a value; redraws. */
  add(step, values) {
    let changed = false;
    for (const s of this.series) {
      const v = values[s.key];
      if (typeof v === "number" && Number.isFinite(v)) {
        s.points.set(step, v);
        changed = true;
      }
    }
    if (changed) this.draw();
  }

  hasData() {
    return this.series.some((s) => s.points.size > 0);
  }

  draw() {
    const svg = this.svg;
    svg.replaceChildren();
    const all = this.series.flatMap((s) => [...s.points.entries()]);
    const plotW = W - PAD.left - PAD.right, plotH = H - PAD.top - PAD.bottom;
    svg.append(el("rect", { x: PAD.left, y: PAD.top, width: plotW, height: plotH, class: "plot" }));
    if (!all.length) {
      svg.append(el("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" }, "no points yet"));
      return;
    }
    const steps = all.map(([x]) => x), values = all.map(([, y]) => y);
    let [x0, x1] = [Math.min(...steps), Math.max(...steps)];
    let [y0, y1] = [Math.min(...values), Math.max(...values)];
    if (x1 === x0) x1 = x0 + 1;
    if (y1 === y0) { y0 -= 0.5; y1 += 0.5; }
    const sx = (x) => PAD.left + ((x - x0) / (x1 - x0)) * plotW;
    const sy = (y) => PAD.top + (1 - (y - y0) / (y1 - y0)) * plotH;
    svg.append(
      el("text", { x: PAD.left - 6, y: PAD.top + 4, "text-anchor": "end", class: "tick" }, fmt(y1)),
      el("text", { x: PAD.left - 6, y: PAD.top + plotH, "text-anchor": "end", class: "tick" }, fmt(y0)),
      el("text", { x: PAD.left, y: H - 18, "text-anchor": "start", class: "tick" }, String(x0)),
      el("text", { x: PAD.left + plotW, y: H - 18, "text-anchor": "end", class: "tick" }, String(x1)),
      el("text", { x: PAD.left + plotW / 2, y: H - 4, "text-anchor": "middle", class: "tick" }, "step"),
    );
    let legendX = PAD.left + 8;
    for (const s of this.series) {
      if (!s.points.size) continue;
      const pts = [...s.points.entries()].sort((a, b) => a[0] - b[0]);
      const path = pts.map(([x, y]) => `${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join(" ");
      svg.append(el("polyline", {
        points: path, fill: "none", stroke: s.color, "stroke-width": 2,
        "data-series": s.key, "data-points": String(pts.length),
      }));
      if (pts.length === 1) svg.append(el("circle", { cx: sx(pts[0][0]), cy: sy(pts[0][1]), r: 3, fill: s.color }));
      const last = pts[pts.length - 1][1];
      svg.append(el("text", { x: legendX, y: PAD.top - 10, fill: s.color, class: "legend" }, `${s.label} ${fmt(last)}`));
      legendX += 190;
    }
  }
}
