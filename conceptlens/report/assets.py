"""The report's inline style sheet and script (no framework, no external resource).

The page reads and prints without the script: every table row and every concept block is in the
HTML. The script only enhances it (progressive enhancement): the ``<html>`` element's ``no-js``
class becomes ``js``; tables with the class ``sortable`` sort on a click on a header cell (by each
cell's ``data-sort`` value when it has one, numbers numerically, missing values last); tables with
the class ``filterable`` get a filter box that hides the rows not containing its text; the
per-concept view (``#concept-view``) shows one concept block at a time, picked with its
``<select>``, its index links or a ``#concept-…`` link anywhere in the page. ``@media print``
shows everything again.
"""

from __future__ import annotations

__all__ = ["CSS", "SCRIPT"]

CSS = """
:root { --fg:#1d232a; --dim:#66707a; --line:#d5d9de; --accent:#2b6cb0; --bg-soft:#f5f7f9; }
* { box-sizing: border-box; }
body { margin:0; font-family: -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; font-size:15px;
       line-height:1.5; color:var(--fg); background:#fff; }
header { padding:1.4rem 2rem 1rem; border-bottom:1px solid var(--line); background:var(--bg-soft); }
header h1 { margin:0 0 .3rem; font-size:1.6rem; font-weight:600; }
header p { margin:0; color:var(--dim); }
.layout { display:grid; grid-template-columns:210px minmax(0,1fr); gap:2rem; max-width:1400px; margin:0 auto; padding:0 2rem 3rem; }
nav.toc { position:sticky; top:0; align-self:start; padding:1.2rem 0; font-size:.9rem; }
nav.toc h2 { font-size:.8rem; text-transform:uppercase; letter-spacing:.06em; color:var(--dim); margin:0 0 .4rem; }
nav.toc ol { margin:0; padding-left:1.2rem; }
nav.toc li { margin:.2rem 0; }
a { color:var(--accent); text-decoration:none; }
a:hover { text-decoration:underline; }
main { min-width:0; }
section { padding-top:1.2rem; border-bottom:1px solid var(--line); padding-bottom:1.2rem; scroll-margin-top:.5rem; }
section h2 { font-size:1.35rem; margin:.2rem 0 .6rem; }
h3 { font-size:1.08rem; margin:1.2rem 0 .4rem; }
h4 { font-size:.98rem; margin:1rem 0 .3rem; color:#333; }
[id] { scroll-margin-top:.5rem; }
.caption { color:#444; background:var(--bg-soft); border-left:3px solid var(--accent); padding:.4rem .7rem; margin:.5rem 0 .9rem; max-width:70rem; }
.missing { color:var(--dim); font-style:italic; }
.dim { color:var(--dim); font-size:.85em; }
code { font-family: "SFMono-Regular", Consolas, "Liberation Mono", monospace; font-size:.88em; }
figure { margin:.4rem 0 1rem; }
figure img { max-width:100%; height:auto; display:block; border:1px solid #eceff2; }
figcaption { color:var(--dim); font-size:.88rem; margin-top:.25rem; }
.grid { display:grid; grid-template-columns:repeat(auto-fill, minmax(440px, 1fr)); gap:1rem 1.5rem; align-items:start; }
.table-wrap { overflow-x:auto; margin:.4rem 0 1rem; }
table { border-collapse:collapse; font-size:.88rem; }
th, td { border:1px solid var(--line); padding:.25rem .55rem; text-align:left; vertical-align:top; }
thead th { background:var(--bg-soft); font-weight:600; }
td.num { text-align:right; font-variant-numeric:tabular-nums; white-space:nowrap; }
tr.sig td { background:#eef8ee; }
tr.weak td { color:var(--dim); }
.js table.sortable thead th { cursor:pointer; user-select:none; }
.ncav-grid { grid-template-columns:minmax(0, 1fr); }
.ncav-grid figure img { max-width:min(100%, 1040px); }
.js table.sortable thead th::after { content:"\\00a0\\2195"; color:#b0b7bf; font-weight:400; }
.js table.sortable thead th[aria-sort=ascending]::after { content:"\\00a0\\2191"; color:var(--accent); }
.js table.sortable thead th[aria-sort=descending]::after { content:"\\00a0\\2193"; color:var(--accent); }
.filter-bar { display:flex; gap:.8rem; align-items:center; margin:.6rem 0 -.1rem; font-size:.88rem; }
.filter-bar input { font:inherit; padding:.2rem .5rem; border:1px solid var(--line); border-radius:3px; width:16rem; max-width:60%; }
.filter-bar span { color:var(--dim); }
.kv-row { display:flex; flex-wrap:wrap; gap:1rem 2rem; align-items:flex-start; }
.kv h3 { margin-top:.4rem; }
.kv th { background:var(--bg-soft); font-weight:600; white-space:nowrap; }
.swatch { display:inline-block; width:.8em; height:.8em; border-radius:2px; margin-right:.4em; vertical-align:baseline; }
ul.findings { margin:.2rem 0 .8rem; }
ul.findings li, ul.notes li, ul.rejected li { margin:.3rem 0; }
ul.rejected li { color:var(--dim); }
a.ref { font-size:.85em; white-space:nowrap; margin-left:.3em; }
.notice { border-left:4px solid #d9822b; background:#fff6ec; padding:.4rem .8rem; margin:.4rem 0 1rem; }
details { margin:.2rem 0 1rem; }
summary { cursor:pointer; color:var(--accent); }
.unmatched { color:var(--dim); font-style:italic; }
.concept-index { display:flex; flex-wrap:wrap; gap:.3rem .4rem; margin:.4rem 0 .8rem; padding:0; list-style:none; }
.concept-index a { display:inline-block; border:1px solid var(--line); border-radius:3px; padding:.05rem .5rem; font-size:.88rem; }
.concept-index a.current { background:var(--accent); color:#fff; border-color:var(--accent); }
.concept-picker { font-size:.95rem; margin:.2rem 0 .4rem; }
.concept-picker select { font:inherit; padding:.15rem .4rem; margin-left:.4rem; }
.concept-block { border-top:2px solid var(--line); margin-top:1rem; padding-top:.2rem; }
.concept-block > h3 { font-size:1.2rem; }
.concept-panels { display:grid; grid-template-columns:repeat(auto-fill, minmax(420px, 1fr)); gap:.5rem 1.5rem; align-items:start; }
svg.chart { max-width:100%; height:auto; font-family:inherit; }
svg.chart .pt:hover { stroke:#000; stroke-width:2; }
.legend { display:flex; flex-wrap:wrap; gap:.1rem 1rem; font-size:.82rem; color:#333; margin:.1rem 0 .6rem; max-width:460px; }
.legend-item { white-space:nowrap; }
.legend-item svg { vertical-align:middle; }
.no-js .js-only { display:none; }
.js .concept-block { display:none; }
.js .concept-block.active { display:block; }
footer { color:var(--dim); font-size:.85rem; text-align:center; padding:1rem; }
@media (max-width: 900px) {
  .layout { display:block; padding:0 1rem 2rem; }
  header { padding:1rem; }
  nav.toc { position:static; background:#fff; border-bottom:1px solid var(--line); padding:.5rem 0; }
  nav.toc ol { display:flex; flex-wrap:wrap; gap:.2rem 1rem; list-style:none; padding:0; }
  .grid, .concept-panels { grid-template-columns:minmax(0, 1fr); }
  .filter-bar input { width:12rem; }
}
@media print {
  nav.toc, .filter-bar, .concept-picker, .concept-index { display:none; }
  .layout { display:block; }
  .js .concept-block { display:block; }
  tr[hidden] { display:table-row; }
  section, figure, .concept-block { break-inside:auto; }
  figure img { break-inside:avoid; }
}
""".strip()

SCRIPT = r"""
(function () {
  "use strict";
  var root = document.documentElement;
  root.classList.remove("no-js");
  root.classList.add("js");
  var each = function (list, fn) { Array.prototype.forEach.call(list, fn); };

  function sortKey(cell) {
    var raw = cell ? cell.getAttribute("data-sort") : null;
    if (raw === null) { raw = cell ? cell.textContent.trim() : ""; }
    if (raw === "" || raw === "\u2014") { return { kind: 2, value: "" }; }
    var value = Number(raw);
    return isFinite(value) ? { kind: 0, value: value } : { kind: 1, value: raw.toLowerCase() };
  }

  function compareKeys(a, b, sign) {
    if (a.kind !== b.kind) { return a.kind - b.kind; }  // numbers, then text, missing values last either way
    if (a.kind === 2) { return 0; }
    return sign * (a.value < b.value ? -1 : a.value > b.value ? 1 : 0);
  }

  function sortTable(table, column, header) {
    var sign = header.getAttribute("aria-sort") === "ascending" ? -1 : 1;
    each(header.parentNode.children, function (cell) { cell.removeAttribute("aria-sort"); });
    header.setAttribute("aria-sort", sign === 1 ? "ascending" : "descending");
    var body = table.tBodies[0];
    var rows = Array.prototype.map.call(body.rows, function (row, index) {
      return { row: row, key: sortKey(row.cells[column]), index: index };
    });
    rows.sort(function (a, b) { return compareKeys(a.key, b.key, sign) || a.index - b.index; });
    rows.forEach(function (item) { body.appendChild(item.row); });
  }

  each(document.querySelectorAll("table.sortable"), function (table) {
    var head = table.tHead && table.tHead.rows[table.tHead.rows.length - 1];
    if (!head) { return; }
    each(head.cells, function (header, column) {
      header.tabIndex = 0;
      header.title = header.title || "sort by this column";
      header.addEventListener("click", function () { sortTable(table, column, header); });
      header.addEventListener("keydown", function (event) {
        if (event.key === "Enter" || event.key === " ") { event.preventDefault(); sortTable(table, column, header); }
      });
    });
  });

  each(document.querySelectorAll("table.filterable"), function (table) {
    var bar = document.createElement("div");
    bar.className = "filter-bar";
    var box = document.createElement("input");
    box.type = "search";
    box.placeholder = "Filter rows\u2026";
    box.setAttribute("aria-label", "filter the rows of the table below");
    var count = document.createElement("span");
    var rows = table.tBodies[0].rows;
    count.textContent = rows.length + " rows";
    bar.appendChild(box);
    bar.appendChild(count);
    var wrap = table.parentNode.classList.contains("table-wrap") ? table.parentNode : table;
    wrap.parentNode.insertBefore(bar, wrap);
    box.addEventListener("input", function () {
      var words = box.value.toLowerCase().split(/\s+/).filter(Boolean);
      var shown = 0;
      each(rows, function (row) {
        var text = row.textContent.toLowerCase();
        var keep = words.every(function (word) { return text.indexOf(word) >= 0; });
        row.hidden = !keep;
        shown += keep ? 1 : 0;
      });
      count.textContent = words.length ? shown + " of " + rows.length + " rows" : rows.length + " rows";
    });
  });

  var view = document.getElementById("concept-view");
  if (view) {
    var blocks = view.querySelectorAll(".concept-block");
    var picker = view.querySelector("select");
    var show = function (id) {
      var found = false;
      each(blocks, function (block) {
        var on = block.id === id;
        block.classList.toggle("active", on);
        found = found || on;
      });
      if (!found) { return false; }
      each(view.querySelectorAll(".concept-index a"), function (link) {
        link.classList.toggle("current", link.getAttribute("href") === "#" + id);
      });
      if (picker) { picker.value = id; }
      return true;
    };
    var fromHash = function () {
      var id = decodeURIComponent(window.location.hash.slice(1));
      if (id && show(id)) { document.getElementById(id).scrollIntoView(); }
    };
    if (picker) { picker.addEventListener("change", function () { show(picker.value); }); }
    window.addEventListener("hashchange", fromHash);
    if (blocks.length) { show(blocks[0].id); }
    fromHash();
  }

  window.addEventListener("beforeprint", function () {  // print everything: folded tables too
    each(document.querySelectorAll("details"), function (details) { details.open = true; });
  });
})();
""".strip()
