"use strict";
const $ = (id) => document.getElementById(id);
function el(tag, text, cls) { const e = document.createElement(tag); if (text !== undefined) e.textContent = text;
  if (cls) e.className = cls; return e; }
function fmt(v, d) { return (v === null || v === undefined) ? "" : (typeof v === "number" ? v.toFixed(d) : String(v)); }
function line(points, color, cls) {
  if (!points.length) return "";
  const d = points.map((p, i) => (i ? "L" : "M") + p[0].toFixed(1) + " " + p[1].toFixed(1)).join(" ");
  const dots = points.map(p => `<circle class="${cls}" cx="${p[0].toFixed(1)}" cy="${p[1].toFixed(1)}" r="3" fill="${color}"/>`).join("");
  return `<path class="${cls}" d="${d}" fill="none" stroke="${color}" stroke-width="2"/>` + dots;
}
function plot(rows, total) {
  const W = 640, H = 260, L = 50, R = 50, T = 15, B = 30, n = Math.max(total, rows.length, 1);
  const x = (r) => L + (n === 1 ? 0.5 : (r - 1) / (n - 1)) * (W - L - R);
  const losses = rows.filter(r => r.train_loss !== null && r.train_loss !== undefined);
  const maxLoss = Math.max(1e-9, ...losses.map(r => r.train_loss));
  const yl = (v) => T + (1 - v / maxLoss) * (H - T - B), ya = (v) => T + (1 - v) * (H - T - B);
  let svg = `<line x1="${L}" y1="${H - B}" x2="${W - R}" y2="${H - B}" stroke="#999"/>`;
  for (let r = 1; r <= n; r++) svg += `<text x="${x(r)}" y="${H - 10}" font-size="11" text-anchor="middle">${r}</text>`;
  svg += `<text x="5" y="${T + 5}" font-size="11">${maxLoss.toFixed(3)}</text><text x="${W - 30}" y="${T + 5}" font-size="11">1.0</text>`;
  svg += line(losses.map(r => [x(r.round), yl(r.train_loss)]), "#2463eb", "loss");
  const aucs = rows.filter(r => r.eval_auc !== null && r.eval_auc !== undefined);
  svg += line(aucs.map(r => [x(r.round), ya(r.eval_auc)]), "#15a34a", "auc");
  $("plot").innerHTML = svg;
}
function render(s, files) {
  $("study").textContent = s.study || "";
  $("phase").textContent = s.phase;
  $("round").textContent = `${s.round || 0}/${s.rounds || 0}`;
  $("nodes").textContent = String(s.nodes_connected || 0);
  $("elapsed").textContent = fmt(s.elapsed_seconds, 0);
  $("updated").textContent = s.updated_at ? "updated " + s.updated_at : "";
  $("message").textContent = s.message || "";
  const body = $("sites").tBodies[0]; body.replaceChildren();
  for (const site of s.sites || []) {
    const tr = el("tr"); tr.dataset.site = site.site; tr.dataset.state = site.state;
    tr.append(el("td", site.site));
    const td = el("td"); td.append(el("span", site.state, "state " + site.state)); tr.append(td);
    tr.append(el("td", site.reason || ""), el("td", fmt(site.last_reply_seconds, 2)));
    tr.append(el("td", Object.entries(site.reply_seconds || {}).map(([k, v]) => `${k}: ${v.toFixed(2)}`).join(", ")));
    body.append(tr);
  }
  const rows = s.metrics || [];
  const mbody = $("metrics").tBodies[0]; mbody.replaceChildren();
  for (const r of rows) {
    const tr = el("tr"); tr.dataset.round = r.round;
    for (const [v, d] of [[r.round, 0], [r.sites, 0], [r.train_loss, 4], [r.eval_auc, 3], [r.eval_accuracy, 3], [r.seconds, 2]])
      tr.append(el("td", fmt(v, d)));
    mbody.append(tr);
  }
  plot(rows, s.rounds || 0);
  const faults = $("faults"); faults.replaceChildren();
  for (const d of s.dropped || []) faults.append(el("li", `${d.site} dropped in round ${d.round}: ${d.reason}`, "dropped"));
  for (const w of s.withheld || []) faults.append(el("li", `${w} withheld its statistics (below its min_cell_count)`, "withheld"));
  for (const r of s.refused || []) faults.append(el("li", `${r.site} refused (${r.code}) in ${r.phase}`, "refused"));
  if (!faults.children.length) faults.append(el("li", "none", "muted"));
  const list = $("files"); list.replaceChildren();
  for (const f of files) { const li = el("li"); const a = el("a", f.name); a.href = f.url; li.append(a, el("span", ` ${f.bytes} bytes`, "muted")); list.append(li); }
}
async function tick() {
  try {
    const [s, f] = await Promise.all([fetch("/api/state").then(r => r.json()), fetch("/api/files").then(r => r.json())]);
    render(s, f.files);
    document.body.dataset.phase = s.phase;
  } catch (e) { $("message").textContent = "view offline: " + e; }
  setTimeout(tick, 1000);
}
tick();
