// The latent index of one SAE: every latent in a table, search by id, sort by density or max.
// Rows come from latents.js (scopeLatents([...]) with [id, density, max, top token, promoted]).
"use strict";
let rows = [];
let sortKey = 0, sortDesc = false;

function scopeLatents(data) { rows = data; }

function render() {
  const query = document.getElementById("search").value.trim();
  const shown = query === "" ? rows : rows.filter((r) => String(r[0]) === query);
  const sorted = shown.slice().sort((a, b) => (sortDesc ? -1 : 1) * (a[sortKey] - b[sortKey]));
  const body = document.getElementById("latents");
  body.replaceChildren(...sorted.map((r) => {
    const tr = document.createElement("tr");
    tr.className = "latent";
    tr.dataset.latent = r[0];
    const link = document.createElement("a");
    link.href = "latent.html?i=" + r[0];
    link.textContent = r[0];
    const cells = [link, (100 * r[1]).toPrecision(3) + "%", r[2].toPrecision(4), JSON.stringify(r[3]), r[4].map((t) => JSON.stringify(t)).join(" ")];
    for (const c of cells) {
      const td = document.createElement("td");
      if (c instanceof Node) td.appendChild(c); else td.textContent = c;
      tr.appendChild(td);
    }
    return tr;
  }));
  document.getElementById("count").textContent = shown.length + " of " + rows.length + " latents";
}

function sortBy(key) {
  sortDesc = sortKey === key ? !sortDesc : true;
  sortKey = key;
  render();
}

window.addEventListener("DOMContentLoaded", () => {
  document.getElementById("search").addEventListener("input", render);
  document.getElementById("search").addEventListener("keydown", (e) => {
    const id = e.target.value.trim();
    if (e.key === "Enter" && rows.some((r) => String(r[0]) === id)) window.location.href = "latent.html?i=" + id;
  });
  for (const th of document.querySelectorAll("th.sortable")) th.addEventListener("click", () => sortBy(Number(th.dataset.key)));
  render();
});
