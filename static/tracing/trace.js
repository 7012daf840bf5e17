// The trace page: select a span to show its (server-rendered) details, collapse and
// expand subtrees. It only toggles `hidden` and classes; it never builds HTML from data.
(function () {
  "use strict";
  const tree = document.getElementById("span-rows");
  const panel = document.getElementById("span-panel");
  if (!tree || !panel) return;

  let selected = tree.querySelector(".span-row.selected");
  let shown = selected && document.getElementById("detail-" + selected.dataset.span);

  function depthOf(row) {
    return Number(row.dataset.depth);
  }

  function select(row, remember) {
    if (!row || row === selected) return;
    if (selected) {
      selected.classList.remove("selected");
      selected.setAttribute("aria-selected", "false");
    }
    if (shown) shown.hidden = true;
    selected = row;
    row.classList.add("selected");
    row.setAttribute("aria-selected", "true");
    shown = document.getElementById("detail-" + row.dataset.span);
    if (shown) {
      shown.hidden = false;
      panel.scrollTop = 0;
    }
    // Shareable: the address names the span (replaceState, so Back leaves the page).
    if (remember) history.replaceState(null, "", "#span-" + row.dataset.span);
  }

  // Rows are flat in depth-first order, so a row's subtree is the run of following rows
  // that are deeper than it. Expanding keeps still-collapsed descendants folded.
  function setExpanded(row, expanded) {
    const twisty = row.querySelector(".twisty");
    if (!twisty) return;
    twisty.setAttribute("aria-expanded", String(expanded));
    row.classList.toggle("collapsed", !expanded);
    row.setAttribute("aria-expanded", String(expanded));
    const depth = depthOf(row);
    let foldedBelow = Infinity;
    for (let next = row.nextElementSibling; next; next = next.nextElementSibling) {
      const d = depthOf(next);
      if (d <= depth) break;
      if (!expanded || d > foldedBelow) {
        next.hidden = true;
        continue;
      }
      foldedBelow = Infinity;
      next.hidden = false;
      if (next.classList.contains("collapsed")) foldedBelow = d;
    }
  }

  function setAll(expanded) {
    for (const row of tree.children) {
      const twisty = row.querySelector(".twisty");
      if (twisty) {
        twisty.setAttribute("aria-expanded", String(expanded));
        row.classList.toggle("collapsed", !expanded);
      }
      row.hidden = !expanded && depthOf(row) > 0;
    }
    if (selected && selected.hidden) select(tree.firstElementChild, true);
  }

  function visibleSibling(row, step) {
    let next = step > 0 ? row.nextElementSibling : row.previousElementSibling;
    while (next && next.hidden) next = step > 0 ? next.nextElementSibling : next.previousElementSibling;
    return next;
  }

  tree.addEventListener("click", function (event) {
    const row = event.target.closest(".span-row");
    if (!row) return;
    if (event.target.closest(".twisty")) {
      setExpanded(row, row.classList.contains("collapsed"));
      return;
    }
    select(row, true);
  });

  tree.addEventListener("keydown", function (event) {
    if (!selected) return;
    let target = null;
    if (event.key === "ArrowDown") target = visibleSibling(selected, 1);
    else if (event.key === "ArrowUp") target = visibleSibling(selected, -1);
    else if (event.key === "ArrowLeft") setExpanded(selected, false);
    else if (event.key === "ArrowRight") setExpanded(selected, true);
    else return;
    event.preventDefault();
    if (target) {
      select(target, true);
      target.scrollIntoView({ block: "nearest" });
    }
  });

  document.querySelectorAll("[data-tree-action]").forEach(function (button) {
    button.addEventListener("click", function () {
      setAll(button.dataset.treeAction === "expand");
    });
  });

  // Open on the span named in the address (#span-<id>), if any.
  const match = /^#span-([0-9a-f-]{36})$/.exec(location.hash);
  const linked = match && tree.querySelector('.span-row[data-span="' + match[1] + '"]');
  if (linked) {
    select(linked, false);
    linked.scrollIntoView({ block: "center" });
  }
})();
