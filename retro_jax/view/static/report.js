// The report's page: filters, sorts and pages the record index, and renders the shown records from their chunks.
// The view's state lives in the URL fragment (#status=revised&q=...&sort=...&page=2, or #record=<id>), so every
// view is a link. All record text goes in through text nodes, never through innerHTML.
"use strict";
(function () {
  const config = JSON.parse(document.getElementById("view-config").textContent);
  const index = JSON.parse(document.getElementById("view-index").textContent);
  const statuses = [...new Set(index.map((e) => e.status))];
  const chunkCache = new Map();
  const chunkWaiters = new Map();
  const MAX_CACHED_CHUNKS = 64;

  const SORTS = {
    file: ["file order", (e) => e.n],
    tokens_saved: ["most tokens saved", (e) => (e.tob == null ? Infinity : -(e.tob - e.toa))],
    tokens_lost: ["most tokens gained", (e) => (e.tob == null ? Infinity : e.tob - e.toa)],
    steps_saved: ["most steps saved", (e) => (e.stb == null ? Infinity : -(e.stb - e.sta))],
    longest: ["longest original", (e) => (e.tob == null ? Infinity : -e.tob)],
  };

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value !== null && value !== undefined && value !== false) node.setAttribute(key, String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  // ---- data ----

  window.retroViewChunk = function (i, chunk) {
    const resolve = chunkWaiters.get(i);
    if (resolve) {
      chunkWaiters.delete(i);
      resolve(chunk);
    }
  };

  function loadChunk(i) {
    if (chunkCache.has(i)) return chunkCache.get(i);
    let promise;
    const inline = document.getElementById("chunk-" + i);
    if (inline) {
      promise = Promise.resolve(JSON.parse(inline.textContent));
    } else {
      promise = new Promise((resolve, reject) => {
        chunkWaiters.set(i, resolve);
        const script = el("script", { src: config.dataDir + "/chunk-" + String(i).padStart(6, "0") + ".js" });
        script.onerror = () => reject(new Error("cannot load " + script.src + " (keep the _data folder beside the page)"));
        script.onload = () => script.remove();
        document.head.append(script);
      });
    }
    chunkCache.set(i, promise);
    if (chunkCache.size > MAX_CACHED_CHUNKS) chunkCache.delete(chunkCache.keys().next().value);
    return promise;
  }

  async function detailOf(entry) {
    const chunk = await loadChunk(entry.c);
    return chunk.records[entry.n - chunk.start];
  }

  // ---- state in the URL fragment ----

  function readState() {
    const params = new URLSearchParams(location.hash.slice(1));
    const status = (params.get("status") || "").split(",").filter((s) => s);
    const per = parseInt(params.get("per") || "", 10);
    return {
      record: params.has("record") ? params.get("record") : null,
      status: new Set(status),
      q: params.get("q") || "",
      inTraces: params.get("in") === "traces",
      sort: SORTS[params.get("sort")] ? params.get("sort") : "file",
      page: Math.max(1, parseInt(params.get("page") || "1", 10) || 1),
      per: per > 0 ? per : config.perPage,
    };
  }

  function writeState(state) {
    const params = new URLSearchParams();
    if (state.record !== null) {
      params.set("record", state.record);
    } else {
      if (state.status.size) params.set("status", [...state.status].join(","));
      if (state.q) params.set("q", state.q);
      if (state.inTraces) params.set("in", "traces");
      if (state.sort !== "file") params.set("sort", state.sort);
      if (state.page > 1) params.set("page", state.page);
      if (state.per !== config.perPage) params.set("per", state.per);
    }
    location.hash = params.toString();
  }

  // Every text of a record: what a search "in traces" looks through.
  function recordText(detail) {
    const parts = [detail.question || "", detail.answer || ""];
    if (detail.original) parts.push(detail.original.head, ...detail.original.steps, detail.original.solution);
    if (detail.revised) parts.push(...detail.revised.steps, detail.revised.solution);
    for (const rollout of detail.rollouts || []) parts.push(String(rollout.text ?? ""));
    for (const node of detail.nodes || []) parts.push(node.text);
    return parts.join("\n").toLowerCase();
  }

  // The entries the state selects, in its order. A search in the index (id, question, gold) is instant; one
  // "in traces" opens every chunk of the records the status filter keeps, so it takes longer on large reports.
  async function selected(state) {
    let entries;
    if (state.record !== null) {
      entries = index.filter((e) => e.id === state.record);
    } else {
      const q = state.q.toLowerCase();
      entries = index.filter((e) => !state.status.size || state.status.has(e.status));
      if (q) {
        const inIndex = (e) => (e.id + "\n" + e.q + "\n" + e.a).toLowerCase().includes(q);
        const kept = [];
        for (const e of entries) {
          if (inIndex(e) || (state.inTraces && recordText(await detailOf(e)).includes(q))) kept.push(e);
        }
        entries = kept;
      }
    }
    const key = SORTS[state.sort][1];
    return entries.sort((a, b) => key(a) - key(b) || a.n - b.n);
  }

  // ---- controls ----

  // Built once: rebuilding them on every render would take the focus from the search box while typing.
  function buildControls() {
    const boxes = el("span", { class: "status-filter" }, "status: ");
    for (const status of statuses) {
      const box = el("input", { type: "checkbox", value: status });
      box.addEventListener("change", () => {
        const next = readState();
        box.checked ? next.status.add(status) : next.status.delete(status);
        Object.assign(next, { page: 1, record: null });
        writeState(next);
      });
      boxes.append(el("label", { class: "s-" + status }, box, " " + status + " "));
    }
    const search = el("input", { type: "search", id: "search", placeholder: "search id, question, answer" });
    let timer = null;
    search.addEventListener("input", () => {
      clearTimeout(timer);
      timer = setTimeout(() => writeState(Object.assign(readState(), { q: search.value, page: 1, record: null })), 250);
    });
    const inTraces = el("input", { type: "checkbox", id: "in-traces" });
    inTraces.addEventListener("change", () => writeState(Object.assign(readState(), { inTraces: inTraces.checked, page: 1 })));
    const sort = el("select", { id: "sort" });
    for (const [name, [label]] of Object.entries(SORTS)) sort.append(el("option", { value: name }, label));
    sort.addEventListener("change", () => writeState(Object.assign(readState(), { sort: sort.value, page: 1 })));
    document.getElementById("controls").append(boxes, el("label", {}, "search ", search),
      el("label", { title: "also search the traces, rollouts and tree nodes (opens every record)" }, inTraces, " in traces"),
      el("label", {}, "sort ", sort),
      el("span", { id: "shown-count" }));
  }

  function syncControls(state) {
    for (const box of document.querySelectorAll(".status-filter input")) box.checked = state.status.has(box.value);
    const search = document.getElementById("search");
    if (document.activeElement !== search) search.value = state.q;
    document.getElementById("sort").value = state.sort;
    document.getElementById("in-traces").checked = state.inTraces;
  }

  for (const button of document.querySelectorAll("button.status-count")) {
    button.addEventListener("click", () => writeState(Object.assign(readState(), {
      status: new Set([button.dataset.status]), page: 1, record: null })));
  }

  // ---- records ----

  function marker(step, accepted, label) {
    return el("span", { class: "boundary" + (accepted ? " accepted" : ""), "data-step": step,
      title: accepted ? "accepted boundary: the search cut here" : "thought boundary" }, (accepted ? label + " " : "") + "b" + step);
  }

  // One trace as text: head, steps (each marked at a thought or accepted boundary), solution. `parts` lists
  // [first step, steps, css class]; steps are numbered from the start of the whole trace.
  function traceBlock(head, parts, solution, bounds, accepted, solutionClass, acceptedLabel) {
    const pre = el("pre", { class: "trace" }, head ? el("span", { class: "head" }, head) : null);
    const boundSet = new Set(bounds);
    const acceptedSet = new Set(accepted);
    for (const [first, steps, css] of parts) {
      steps.forEach((text, j) => {
        const step = first + j;
        if (step > 0) pre.append(el("span", { class: css }, "\n\n"));
        if (step > 0 && (boundSet.has(step) || acceptedSet.has(step))) pre.append(marker(step, acceptedSet.has(step), acceptedLabel));
        pre.append(el("span", { class: "step " + css, "data-step": step }, text));
      });
    }
    pre.append(el("span", { class: "solution " + solutionClass }, solution));
    return pre;
  }

  function searchPanes(detail) {
    const original = detail.original;
    const revised = detail.revised;
    if (!revised) {
      return el("div", { class: "sides single" }, el("div", { class: "pane original" }, el("h4", {}, "trace (unchanged by the search)"),
        traceBlock(original.head, [[0, original.steps, "kept"]], original.solution, original.bounds, [], "kept", "")));
    }
    const keep = revised.keep;
    const before = traceBlock(original.head, [[0, original.steps.slice(0, keep), "kept"], [keep, original.steps.slice(keep), "removed"]],
      original.solution, original.bounds, detail.accepted.filter((b) => b === keep), "removed", "cut");
    const after = traceBlock(original.head, [[0, original.steps.slice(0, keep), "kept"], [keep, revised.steps, "new"]],
      revised.solution, revised.bounds, detail.accepted, "new", "new");
    return el("div", { class: "sides" },
      el("div", { class: "pane original" }, el("h4", {}, `original: steps ${keep}–${original.steps.length - 1} and the solution removed`), before),
      el("div", { class: "pane revised" }, el("h4", {}, `revised: new continuation from step ${keep}`), after));
  }

  function badges(fields) {
    return Object.entries(fields).filter(([k]) => k !== "text").map(([k, v]) => el("span", {
      class: "badge" + (k === "correct" ? (v ? " correct" : " wrong") : "") }, k + ": " + JSON.stringify(v)));
  }

  function rolloutList(rollouts) {
    const list = el("ol", { class: "rollout-list" });
    for (const rollout of rollouts) {
      list.append(el("li", {}, ...badges(rollout), el("pre", { class: "trace" }, rollout.text == null ? "" : String(rollout.text))));
    }
    return el("details", { class: "rollouts" }, el("summary", {}, rollouts.length + " kept rollouts"), list);
  }

  function treeOutline(nodes) {
    const ids = new Set(nodes.map((n) => n.id));
    const children = new Map();
    const roots = [];
    for (const node of nodes) {
      if (node.parent === null || node.parent === undefined || !ids.has(node.parent) || node.parent === node.id) roots.push(node);
      else (children.get(node.parent) || children.set(node.parent, []).get(node.parent)).push(node);
    }
    const seen = new Set();
    function nodeView(node, depth) {
      seen.add(node.id);
      const mean = node.visits ? (node.reward / node.visits).toFixed(2) : "–";
      const short = node.text.length <= 90; // the summary line shows all of it: no text block below
      const view = el("details", { class: "node t-" + node.type, "data-node": node.id, open: depth < 2 },
        el("summary", {}, el("span", { class: "type" }, node.type || "node"), " ",
          el("span", { class: "badge" }, "visits " + (node.visits ?? "–")),
          el("span", { class: "badge" }, "reward " + (node.reward ?? "–") + " (mean " + mean + ")"),
          node.correct === null || node.correct === undefined ? null
            : el("span", { class: "badge " + (node.correct ? "correct" : "wrong") }, node.correct ? "correct" : "wrong"),
          el("span", { class: "snippet" }, short ? node.text : node.text.slice(0, 90) + "…")),
        short ? null : el("pre", { class: "trace" }, node.text));
      for (const child of children.get(node.id) || []) if (!seen.has(child.id)) view.append(nodeView(child, depth + 1));
      return view;
    }
    return el("div", { class: "tree" }, ...roots.map((root) => nodeView(root, 0)));
  }

  function countsLine(entry, detail) {
    const line = el("span", { class: "counts" });
    if (entry.tob != null && entry.toa != null) {
      const saved = entry.tob - entry.toa;
      line.append(`tokens ${entry.tob} → ${entry.toa} `,
        el("span", { class: "saving " + (saved > 0 ? "gain" : saved < 0 ? "loss" : "") }, `(${saved > 0 ? "−" + saved : "+" + -saved})`));
    }
    if (entry.stb != null) line.append(` · steps ${entry.stb} → ${entry.sta}`);
    if (entry.thb != null) line.append(` · thoughts ${entry.thb} → ${entry.tha}`);
    if (entry.nodes != null) line.append(` · ${entry.nodes} nodes`);
    return line;
  }

  function recordView(entry, detail) {
    const card = el("article", { class: "record s-" + entry.status, id: "record-" + entry.n, "data-id": entry.id,
      "data-status": entry.status, "data-kind": entry.kind });
    const link = el("a", { class: "permalink", href: "#record=" + encodeURIComponent(entry.id), title: "permalink" }, "#" + entry.id);
    card.append(el("h3", {}, link, el("span", { class: "status s-" + entry.status }, entry.status), countsLine(entry, detail)));
    if (detail.question !== undefined) {
      card.append(el("div", { class: "qa" }, el("div", { class: "question" }, el("b", {}, "question "), detail.question),
        el("div", {}, el("b", {}, "gold "), el("span", { class: "gold" }, detail.answer))));
    }
    if (detail.reason) card.append(el("div", { class: "reason" }, detail.reason));
    if (detail.kind === "search") card.append(searchPanes(detail));
    if (detail.kind === "tree") card.append(treeOutline(detail.nodes));
    if (detail.rollouts && detail.rollouts.length) card.append(rolloutList(detail.rollouts));
    const counts = Object.entries(detail.counts || {});
    if (counts.length) card.append(el("details", { class: "fields" }, el("summary", {}, "all fields"), ...badges(detail.counts)));
    return card;
  }

  function pager(state, total) {
    const nav = document.getElementById("pager");
    nav.replaceChildren();
    const pages = Math.max(1, Math.ceil(total / state.per));
    const go = (page) => () => writeState(Object.assign(readState(), { page }));
    const prev = el("button", { type: "button", disabled: state.page <= 1 }, "‹ previous");
    const next = el("button", { type: "button", disabled: state.page >= pages }, "next ›");
    prev.addEventListener("click", go(state.page - 1));
    next.addEventListener("click", go(state.page + 1));
    nav.append(prev, `page ${Math.min(state.page, pages)} of ${pages}`, next);
  }

  let renderCount = 0;
  async function render() {
    const ticket = ++renderCount;
    const state = readState();
    syncControls(state);
    if (state.q && state.inTraces) document.getElementById("shown-count").textContent = "searching the traces…";
    const main = document.getElementById("records");
    const first = (state.page - 1) * state.per;
    let entries, shown, details;
    try {
      entries = await selected(state);
      shown = entries.slice(first, first + state.per);
      details = await Promise.all(shown.map(detailOf));
    } catch (error) {
      main.replaceChildren(el("p", { class: "reason" }, String(error)));
      return;
    }
    if (ticket !== renderCount) return; // a newer state arrived while the chunks loaded
    main.replaceChildren(...shown.map((entry, i) => recordView(entry, details[i])));
    const filtered = entries.length === index.length ? "" : ` (${entries.length} match, of ${index.length})`;
    document.getElementById("shown-count").textContent = shown.length
      ? `records ${first + 1}–${first + shown.length}${filtered || " of " + index.length}` : `no record matches${filtered}`;
    if (state.record !== null) {
      document.getElementById("shown-count").append(" · ", el("a", { href: "#" }, "show all"));
    }
    pager(state, entries.length);
    document.body.dataset.ready = "1";
    document.body.dataset.shown = String(shown.length);
    document.body.dataset.matching = String(entries.length);
  }

  buildControls();
  window.addEventListener("hashchange", render);
  render();
})();
