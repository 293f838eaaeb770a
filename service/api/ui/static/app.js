// The dashboard's only script: live job progress. Each .progress[data-job] polls the JSON API
// (GET /v1/jobs/{id}, read with the session cookie) and reloads the page once the job is done.
"use strict";
(function () {
  const TERMINAL = ["succeeded", "failed", "cancelled"];
  function watch(el) {
    const id = el.dataset.job;
    if (TERMINAL.includes(el.dataset.status)) return;
    const tick = async () => {
      let job;
      try {
        const r = await fetch(`/v1/jobs/${id}`, {credentials: "same-origin",
                                                  headers: {Accept: "application/json"}});
        if (!r.ok) throw new Error(`HTTP ${r.status}`);
        job = await r.json();
      } catch (e) {
        setTimeout(tick, 2000);
        return;
      }
      const pct = (100 * job.progress).toFixed(1);
      el.querySelector(".fill").style.width = `${pct}%`;
      el.querySelector(".job-status").textContent = job.status;
      el.querySelector(".job-stage").textContent = job.stage;
      el.querySelector(".job-pct").textContent = `${pct}%`;
      if (TERMINAL.includes(job.status)) {
        el.dataset.status = job.status;
        window.location.reload();
      } else {
        setTimeout(tick, 700);
      }
    };
    tick();
  }
  function showRange() {
    const sel = document.getElementById("model");
    const out = document.getElementById("feasible");
    if (!sel || !out) return;
    const opt = sel.options[sel.selectedIndex];
    out.textContent = (opt && opt.dataset.range) || "unknown until the model is registered";
  }
  document.addEventListener("DOMContentLoaded", () => {
    document.querySelectorAll(".progress[data-job]").forEach(watch);
    const sel = document.getElementById("model");
    if (sel) { sel.addEventListener("change", showRange); showRange(); }
  });
})();
