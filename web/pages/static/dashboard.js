// The live dashboard: polls the figures every 5 s, writes the numbers in place and redraws each card's
// per-minute charts as SVG polylines.
(function () {
  "use strict";
  const root = document.getElementById("dashboard");
  const url = root.dataset.url;
  const dash = "\u2013";

  function draw(svg, values) {
    const line = svg.querySelector("polyline");
    const top = Math.max(1, ...values);
    const step = values.length > 1 ? 300 / (values.length - 1) : 0;
    const points = values.map((v, i) => `${(i * step).toFixed(1)},${(58 - (v / top) * 54).toFixed(1)}`);
    line.setAttribute("points", points.join(" "));
    svg.dataset.max = String(top);
  }

  function failures(byReason) {
    const parts = Object.entries(byReason).map(([reason, count]) => `${reason}: ${count}`);
    return parts.length ? parts.join(" ") : "none";
  }

  function render(figures) {
    for (const model of figures.models) {
      const card = root.querySelector(`.model-card[data-model="${CSS.escape(model.name)}"]`);
      if (!card) { window.location.reload(); return; }  // a model appeared: draw the page again
      for (const cell of card.querySelectorAll("[data-figure]")) {
        const name = cell.dataset.figure;
        const value = model[name];
        cell.textContent = name === "failures_last_5m" ? failures(value) : (value === null ? dash : String(value));
      }
      for (const svg of card.querySelectorAll("svg[data-series]")) draw(svg, model.series[svg.dataset.series]);
    }
    document.getElementById("updated").textContent =
      "Updated " + new Date(figures.generated_at * 1000).toLocaleTimeString() + ".";
  }

  async function poll() {
    try {
      const response = await fetch(url, { headers: { Accept: "application/json" }, credentials: "same-origin" });
      if (response.ok) render(await response.json());
    } catch (err) {
      document.getElementById("updated").textContent = "Not updating: " + err;
    }
  }

  render(JSON.parse(document.getElementById("initial-figures").textContent));
  setInterval(poll, 5000);
})();
