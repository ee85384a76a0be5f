// lorareg gallery (export-site): filter the cards in the page and copy text. Works from file://.
"use strict";

document.addEventListener("click", (event) => {
  const button = event.target.closest("[data-copy]");
  if (!button) return;
  const text = button.dataset.copy;
  const done = () => { button.classList.add("copied"); setTimeout(() => button.classList.remove("copied"), 900); };
  if (navigator.clipboard && window.isSecureContext) {
    navigator.clipboard.writeText(text).then(done, () => {});
    return;
  }
  const area = document.createElement("textarea");
  area.value = text;
  document.body.appendChild(area);
  area.select();
  document.execCommand("copy");
  area.remove();
  done();
});

const form = document.getElementById("gallery-filters");
if (form) {
  const cards = Array.from(document.querySelectorAll("#gallery .card"));
  const shown = document.getElementById("shown");
  const apply = () => {
    const words = form.elements.q.value.toLowerCase().split(/\s+/).filter(Boolean);
    const arch = form.elements.arch.value;
    const tag = form.elements.tag.value;
    let count = 0;
    for (const card of cards) {
      const visible = words.every((w) => card.dataset.search.includes(w)) &&
        (!arch || card.dataset.arch === arch) && (!tag || card.dataset.tags.split("\n").includes(tag));
      card.hidden = !visible;
      if (visible) count += 1;
    }
    shown.textContent = String(count);
  };
  form.addEventListener("input", apply);
  form.addEventListener("submit", (event) => { event.preventDefault(); apply(); });
}
