// outbox console: refresh the parts of a page marked data-refresh="URL" every data-every seconds.
// Not while the tab is hidden (a background tab costs the database nothing; it refreshes at
// once when shown again), and slower after failures (doubling up to a minute), marked stale.
"use strict";
const MAX_DELAY = 60000;
document.addEventListener("DOMContentLoaded", () => {
  for (const box of document.querySelectorAll("[data-refresh]")) {
    const every = Math.max(1, Number(box.dataset.every || 5)) * 1000;
    let delay = every;
    let timer = null;
    let paused = false;
    const refresh = async () => {
      timer = null;
      if (document.hidden) { paused = true; return; }
      let ok = false;
      try {
        const response = await fetch(box.dataset.refresh, {credentials: "same-origin"});
        if (response.ok) { box.innerHTML = await response.text(); ok = true; }
      } catch (e) { /* counted as a failure below */ }
      delay = ok ? every : Math.min(delay * 2, MAX_DELAY);
      box.classList.toggle("stale", !ok);
      box.title = ok ? "" : "not refreshed: the console did not answer; retrying";
      timer = setTimeout(refresh, delay);
    };
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden && paused) { paused = false; refresh(); }
    });
    timer = setTimeout(refresh, every);
  }
});

// Filter forms leave empty fields out of the URL, so links to a filtered page stay short.
document.addEventListener("submit", (event) => {
  const form = event.target;
  if (!form.classList || !form.classList.contains("filters")) return;
  for (const field of form.querySelectorAll("input, select")) {
    if (field.name && field.value === "") field.disabled = true;
  }
});
