// Live numbers on the admin page: cache use, migration progress and running verifications, polled from the
// API with the login cookie.
(function () {
  "use strict";
  const running = document.querySelectorAll("tr[data-verification][data-state=running]");
  if (!running.length) return;
  async function watch() {
    try {
      const resp = await fetch("/api/v1/verifications", { credentials: "same-origin", headers: { Accept: "application/json" } });
      if (resp.ok) {
        const jobs = new Map((await resp.json()).map((j) => [j.id, j]));
        for (const row of running) {
          const j = jobs.get(row.dataset.verification);
          if (j && j.state !== "running") { window.location.reload(); return; }  // the server renders the result
        }
      }
    } catch (e) { /* the next poll tries again */ }
    setTimeout(watch, 2000);
  }
  setTimeout(watch, 2000);
})();

(function () {
  "use strict";
  const rows = document.querySelectorAll("tr[data-session]");
  if (!rows.length) return;
  const fmt = (n) => {
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return i ? n.toFixed(1) + " " + units[i] : n + " B";
  };
  async function refresh() {
    let sessions;
    try {
      const resp = await fetch("/api/v1/sessions", { credentials: "same-origin", headers: { Accept: "application/json" } });
      if (!resp.ok) return;
      sessions = await resp.json();
    } catch (e) { return; }
    const byId = new Map(sessions.map((s) => [s.id, s]));
    let migrating = false;
    for (const row of rows) {
      const s = byId.get(row.dataset.session);
      if (!s) { row.classList.add("gone"); continue; }
      row.querySelector(".cache-used").textContent = fmt(s.cache_used_bytes);
      row.querySelector(".cache-bar").value = s.cache_used_bytes;
      row.querySelector(".changed").textContent = fmt(s.changed_bytes);
      const m = s.migration;
      const cell = row.querySelector(".migration");
      if (m && cell) {
        let bar = cell.querySelector("progress");
        if (!bar) { cell.textContent = ""; bar = document.createElement("progress"); bar.max = 100; cell.append(bar, document.createElement("span")); }
        bar.value = m.percent;
        const label = cell.querySelector("span");
        label.className = "migration-text";
        label.textContent = " " + m.percent + "%" + (m.error ? " failed: " + m.error : m.running ? "" : " done → " + m.output);
        migrating = migrating || m.running;
      }
    }
    setTimeout(refresh, migrating ? 1000 : 3000);
  }
  setTimeout(refresh, 1000);
})();
