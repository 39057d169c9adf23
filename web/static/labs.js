// Live lab progress: while a lab runs, its page (and the labs list) is fetched again every 2 s and the lab's
// section replaced with the server's rendering, so there is one template for a lab, not a second one in here.
(function () {
  "use strict";
  const lab = document.getElementById("lab");
  const list = document.getElementById("labs");
  const live = lab ? lab.dataset.live === "yes" : !!(list && list.querySelector("tr[data-lab][data-state=verifying], tr[data-lab][data-state=starting], tr[data-lab][data-state=running]"));
  if (!live) return;
  const target = lab ? "lab" : "labs";
  async function refresh() {
    try {
      const resp = await fetch(window.location.pathname, { credentials: "same-origin", headers: { Accept: "text/html" } });
      if (resp.ok) {
        const doc = new DOMParser().parseFromString(await resp.text(), "text/html");
        const fresh = doc.getElementById(target);
        const current = document.getElementById(target);
        if (fresh && current) {
          current.replaceWith(fresh);
          if (lab && fresh.dataset.live !== "yes") return;  // the lab ended: its last state stays shown
        }
      }
    } catch (e) { /* the next poll tries again */ }
    setTimeout(refresh, 2000);
  }
  setTimeout(refresh, 2000);
})();
