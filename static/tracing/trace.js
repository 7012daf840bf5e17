// The trace page: select a span to fetch and show its details, collapse and expand
// subtrees. It never builds HTML from data: the details arrive as a fragment the server
// rendered (and escaped) for us.
(function () {
  "use strict";
  const tree = document.getElementById("span-rows");
  const panel = document.getElementById("span-panel");
  if (!tree || !panel) return;

  const PLACEHOLDER = "00000000-0000-0000-0000-000000000000";
  const spanUrl = panel.dataset.spanUrl;
  // Fragments already fetched, by span id: going back to a span costs nothing.
  const fragments = new Map();
  let pending = null;
  let selected = tree.querySelector(".span-row.selected");

  function depthOf(row) {
    return Number(row.dataset.depth);
  }

  function showNote(text) {
    const note = document.createElement("p");
    note.className = "panel-note error";
    note.textContent = text;
    panel.replaceChildren(note);
  }

  function showFragment(html) {
    // innerHTML is safe here, and only here: `html` is the body of a same-origin
    // response from our own tracing:span view, a Django template with autoescaping on,
    // so every span name, prompt and result in it is already escaped text.
    panel.innerHTML = html;
    panel.scrollTop = 0;
  }

  async function load(spanId) {
    if (pending) pending.abort();
    pending = null;
    if (fragments.has(spanId)) {
      panel.removeAttribute("aria-busy");
      showFragment(fragments.get(spanId));
      return;
    }
    const controller = new AbortController();
    pending = controller;
    panel.setAttribute("aria-busy", "true");
    try {
      const response = await fetch(spanUrl.replace(PLACEHOLDER, spanId), {
        credentials: "same-origin",
        headers: { Accept: "text/html" },
        signal: controller.signal,
      });
      if (pending !== controller) return; // another span was selected meanwhile
      // A lapsed session is redirected to the login page: not a fragment to show.
      if (response.redirected || !response.ok) {
        showNote(
          response.status === 404
            ? "This span is no longer available."
            : response.redirected
              ? "Your session has ended: reload the page to sign in again."
              : "Could not load this span (HTTP " + response.status + ")."
        );
        return;
      }
      const html = await response.text();
      fragments.set(spanId, html);
      if (pending === controller) showFragment(html);
    } catch (error) {
      if (pending === controller) showNote("Could not load this span: " + error.message);
    } finally {
      if (pending === controller) {
        pending = null;
        panel.removeAttribute("aria-busy");
      }
    }
  }

  function select(row, remember) {
    if (!row || row === selected) return;
    if (selected) {
      selected.classList.remove("selected");
      selected.setAttribute("aria-selected", "false");
    }
    selected = row;
    row.classList.add("selected");
    row.setAttribute("aria-selected", "true");
    load(row.dataset.span);
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
  // The first row starts selected; its details are fetched like any other's.
  if (selected && !pending) load(selected.dataset.span);
})();
