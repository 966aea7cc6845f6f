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

// Filter forms leave empty fields out of the URL, so links to a filtered page stay short.
document.addEventListener("submit", (event) => {
  const form = event.target;
  if (!form.classList || !form.classList.contains("filters")) return;
  for (const field of form.querySelectorAll("input, select")) {
    if (field.name && field.value === "") field.disabled = true;
  }
});
