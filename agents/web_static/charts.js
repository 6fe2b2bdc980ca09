/* mesh console: small live line charts drawn as SVG polylines (no library).
   meshCharts.line(svg, points, series) redraws one chart from its rolling window of points;
   each series is {key, cls, max?, label}. Only the chart whose data changed is redrawn. */
"use strict";
(function () {
  const NS = "http://www.w3.org/2000/svg";
  const W = 300, H = 70;

  function el(name, attrs) {
    const e = document.createElementNS(NS, name);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    return e;
  }

  function line(svg, points, series) {
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
    svg.setAttribute("preserveAspectRatio", "none");
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    if (!points.length) {
      const t = el("text", { x: 6, y: 14 });
      t.textContent = "waiting for telemetry";
      svg.appendChild(t);
      return;
    }
    const t0 = points[0].at, t1 = points[points.length - 1].at;
    const span = Math.max(t1 - t0, 1);
    let label = "";
    series.forEach((s) => {
      const vals = points.map((p) => p[s.key]).filter((v) => v !== null && v !== undefined);
      const max = s.max || Math.max(1, ...vals);
      const pts = [];
      for (const p of points) {
        const v = p[s.key];
        if (v === null || v === undefined) continue;
        const x = ((p.at - t0) / span) * (W - 2) + 1;
        const y = H - 2 - (Math.min(v, max) / max) * (H - 14);
        pts.push(`${x.toFixed(1)},${y.toFixed(1)}`);
      }
      svg.appendChild(el("polyline", { points: pts.join(" "), class: s.cls }));
      const last = vals.length ? vals[vals.length - 1] : null;
      if (last !== null) label += `${s.label} ${Math.round(last)}${s.unit || ""}  `;
    });
    const t = el("text", { x: 4, y: 11 });
    t.textContent = label;
    svg.appendChild(t);
  }

  window.meshCharts = { line };
})();
