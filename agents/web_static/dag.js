/* mesh console: a plan's DAG as SVG. The server lays the plan out in layers (mesh/consoleview.py)
   and serves a window of it; this draws that window and recolours single nodes as their tasks
   change. A 100,000-task plan costs the page the window's nodes (ROWS x COLS at most), never
   the plan; moving the window fetches the next one. */
"use strict";
(function () {
  const NS = "http://www.w3.org/2000/svg";
  const ROWS = 16, COLS = 10, NW = 124, NH = 26, HG = 16, VG = 30, PAD = 10;

  function el(name, attrs) {
    const e = document.createElementNS(NS, name);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    return e;
  }

  class DagView {
    constructor(box, planId, onSelect) {
      this.box = box;
      this.planId = planId;
      this.onSelect = onSelect;
      this.row0 = 0;
      this.col0 = 0;
      this.layers = 0;
      this.width = 0;
      this.nodes = new Map(); // task id -> <g>
      this.info = document.createElement("span");
      this.info.className = "muted";
      const bar = document.createElement("div");
      bar.className = "bar";
      const moves = [["◀", 0, -COLS], ["▲", -ROWS, 0], ["▼", ROWS, 0], ["▶", 0, COLS]];
      this.buttons = moves.map(([label, dr, dc]) => {
        const b = document.createElement("button");
        b.type = "button";
        b.textContent = label;
        b.addEventListener("click", () => this.move(this.row0 + dr, this.col0 + dc));
        bar.appendChild(b);
        return b;
      });
      bar.appendChild(this.info);
      this.wrap = document.createElement("div");
      this.wrap.className = "dag-wrap";
      box.appendChild(bar);
      box.appendChild(this.wrap);
    }

    move(row0, col0) {
      this.row0 = Math.max(0, Math.min(row0, Math.max(0, this.layers - 1)));
      this.col0 = Math.max(0, Math.min(col0, Math.max(0, this.width - 1)));
      return this.load();
    }

    focus(layer, pos) {
      if (layer >= this.row0 && layer < this.row0 + ROWS && pos >= this.col0 && pos < this.col0 + COLS) {
        return Promise.resolve();
      }
      return this.move(layer - (layer % ROWS), pos - (pos % COLS));
    }

    async load() {
      const q = `row0=${this.row0}&rows=${ROWS}&col0=${this.col0}&cols=${COLS}`;
      const data = await window.meshApi.get(`/api/plans/${encodeURIComponent(this.planId)}/dag?${q}`);
      this.layers = data.layers;
      this.width = data.width;
      this.draw(data);
    }

    draw(data) {
      this.nodes.clear();
      const rows = Math.min(ROWS, Math.max(1, this.layers - this.row0));
      const cols = Math.min(COLS, Math.max(1, this.width - this.col0));
      const w = PAD * 2 + cols * (NW + HG) - HG, h = PAD * 2 + rows * (NH + VG) - VG;
      const svg = el("svg", { class: "dag", width: w, height: h, viewBox: `0 0 ${w} ${h}`, role: "img" });
      const at = new Map();
      for (const n of data.nodes) {
        at.set(n.i, [PAD + (n.pos - this.col0) * (NW + HG), PAD + (n.layer - this.row0) * (NH + VG)]);
      }
      const edges = el("g", {});
      for (const [a, b] of data.edges) {
        const p = at.get(a), q = at.get(b);
        if (!p || !q) continue;
        const x1 = p[0] + NW / 2, y1 = p[1] + NH, x2 = q[0] + NW / 2, y2 = q[1], m = (y1 + y2) / 2;
        edges.appendChild(el("path", { class: "edge", d: `M${x1},${y1} C${x1},${m} ${x2},${m} ${x2},${y2}` }));
      }
      svg.appendChild(edges);
      for (const n of data.nodes) {
        const [x, y] = at.get(n.i);
        const g = el("g", { class: `node n-${n.status}`, "data-task": n.id, transform: `translate(${x},${y})` });
        const r = el("rect", { width: NW, height: NH });
        const title = el("title", {});
        title.textContent = `${n.id}: ${n.status}`;
        const t = el("text", { x: 6, y: 17 });
        t.textContent = n.id.length > 18 ? n.id.slice(0, 17) + "…" : n.id;
        g.appendChild(r);
        g.appendChild(title);
        g.appendChild(t);
        g.addEventListener("click", () => this.onSelect(n.id));
        svg.appendChild(g);
        this.nodes.set(n.id, g);
      }
      this.wrap.replaceChildren(svg);
      const big = this.layers > ROWS || this.width > COLS;
      this.buttons.forEach((b) => { b.hidden = !big; });
      this.info.textContent = big
        ? `layers ${this.row0 + 1}–${Math.min(this.row0 + ROWS, this.layers)} of ${this.layers}, ` +
          `columns ${this.col0 + 1}–${Math.min(this.col0 + COLS, this.width)} of ${this.width}` +
          (data.outside ? ` (${data.outside} edges leave the window)` : "")
        : "";
    }

    update(taskId, status) {
      const g = this.nodes.get(taskId);
      if (!g) return;
      g.setAttribute("class", `node n-${status}`);
      const title = g.querySelector("title");
      if (title) title.textContent = `${taskId}: ${status}`;
    }
  }

  window.MeshDag = DagView;
})();
