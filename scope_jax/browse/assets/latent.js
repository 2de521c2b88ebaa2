// One latent's page: latent.html?i=ID loads data/ID.js, which calls scopeLatent(record): a
// Neuronpedia dashboard feature plus `scope` (see scope_jax/browse/browser.py).
"use strict";

function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function context(act, center, scale) {
  const div = el("div", { class: "ctx" });
  div.appendChild(el("span", { class: "value" }, act.values[center].toPrecision(4)));
  act.tokens.forEach((t, j) => {
    const span = el("span", { class: "tok" + (j === center ? " center" : ""), title: act.values[j].toPrecision(4) }, t);
    const a = scale > 0 ? Math.min(1, act.values[j] / scale) : 0;
    if (a > 0) span.style.background = "rgba(224, 138, 44, " + (0.15 + 0.85 * a).toFixed(3) + ")";
    div.appendChild(span);
  });
  return div;
}

function tokens(strs, values) {
  const div = el("div", { class: "tokens" });
  strs.forEach((t, j) => div.appendChild(el("span", {}, JSON.stringify(t) + " " + values[j].toFixed(2))));
  return div;
}

function histogram(edges, counts) {
  const svgNS = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(svgNS, "svg");
  svg.setAttribute("id", "hist");
  svg.setAttribute("width", "480");
  svg.setAttribute("height", "100");
  const top = Math.max(1, ...counts);
  const w = 480 / Math.max(1, counts.length);
  counts.forEach((n, j) => {
    const r = document.createElementNS(svgNS, "rect");
    const height = (96 * n) / top;
    r.setAttribute("x", j * w);
    r.setAttribute("y", 100 - height);
    r.setAttribute("width", Math.max(1, w - 1));
    r.setAttribute("height", height);
    const t = document.createElementNS(svgNS, "title");
    t.textContent = edges[j].toPrecision(3) + "–" + edges[j + 1].toPrecision(3) + ": " + n;
    r.appendChild(t);
    svg.appendChild(r);
  });
  return svg;
}

function scopeLatent(d) {
  const s = d.scope;
  const main = document.getElementById("main");
  document.title = s.sae + " latent " + s.latent;
  main.appendChild(el("h1", {}, s.sae + " · latent " + s.latent));
  main.appendChild(el("p", { id: "stats" }, "density " + (100 * d.frac_nonzero).toPrecision(3) + "% (" + s.fires + " of " +
    s.rows + " rows) · max activation " + s.max.toPrecision(4)));
  if (s.children && s.children.length) {
    main.appendChild(el("h2", {}, "children in " + s.children_sae));
    const p = el("p", { id: "children" });
    for (const [id, cos, both] of s.children) {
      p.appendChild(el("a", { href: "../" + s.children_sae + "/latent.html?i=" + id }, String(id)));
      p.appendChild(document.createTextNode(" (decoder cos " + cos.toFixed(2) + ", fires with it on " +
        (100 * both).toFixed(0) + "% of its tokens)  "));
    }
    main.appendChild(p);
  }
  if (s.fires === 0) {
    main.appendChild(el("p", { id: "silent" }, "never active on the rows scanned"));
    return;
  }
  main.appendChild(el("h2", {}, "activation histogram (log-spaced bins)"));
  main.appendChild(histogram(s.hist_edges, d.freq_hist_data_bar_heights));
  if (d.pos_str.length) {
    main.appendChild(el("h2", {}, "tokens the decoder direction promotes"));
    main.appendChild(tokens(d.pos_str, d.pos_values));
    main.appendChild(el("h2", {}, "tokens it suppresses"));
    main.appendChild(tokens(d.neg_str, d.neg_values));
  }
  const top = el("div", { id: "top" });
  const sampled = el("div", { id: "samples" });
  let quantile = null;
  d.activations.forEach((act, j) => {
    if (act.bin_min < 0) {
      top.appendChild(context(act, s.centers[j], s.max));
      return;
    }
    if (s.quantiles[j] !== quantile) {
      quantile = s.quantiles[j];
      sampled.appendChild(el("p", { class: "muted" }, "around quantile " + quantile + " of its activations (" +
        act.bin_min.toPrecision(3) + "–" + act.bin_max.toPrecision(3) + ", " + (100 * act.bin_contains).toPrecision(3) + "% of them)"));
    }
    sampled.appendChild(context(act, s.centers[j], s.max));
  });
  main.appendChild(el("h2", {}, "top activations"));
  main.appendChild(top);
  main.appendChild(el("h2", {}, "sampled across its activations"));
  main.appendChild(sampled);
}

window.addEventListener("DOMContentLoaded", () => {
  const id = new URLSearchParams(window.location.search).get("i");
  if (!/^[0-9]+$/.test(id || "")) {
    document.getElementById("main").textContent = "no latent: open latent.html?i=ID from the index";
    return;
  }
  const script = document.createElement("script");
  script.src = "data/" + id + ".js";
  script.onerror = () => { document.getElementById("main").textContent = "latent " + id + " is not in this SAE"; };
  document.head.appendChild(script);
});
