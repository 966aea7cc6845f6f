// outbox console: refresh the parts of a page marked data-refresh="URL" every data-every seconds.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  for (const box of document.querySelectorAll("[data-refresh]")) {
    const every = Math.max(1, Number(box.dataset.every || 5)) * 1000;
    const refresh = async () => {
      try {
        const response = await fetch(box.dataset.refresh, {credentials: "same-origin"});
        if (response.ok) box.innerHTML = await response.text();
      } catch (e) { /* the next tick tries again */ }
      setTimeout(refresh, every);
    };
    setTimeout(refresh, every);
  }
});
