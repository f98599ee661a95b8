// sagaline dashboard: confirmations, live updates over server-sent events, filters.
// Plain JavaScript, no build step and no library.
(function () {
  "use strict";

  function swap(container, url) {
    return fetch(url, { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (html) {
        if (html === null) { return; }
        // Rows of earlier events loaded on demand stay, with every row the new
        // body no longer shows (the newest events moved on meanwhile).
        var oldRows = container.querySelector("#history-rows");
        var kept = earlierLoaded && oldRows ? Array.prototype.slice.call(oldRows.rows) : [];
        var open = {};
        container.querySelectorAll("details[open]").forEach(function (d, i) { open[i] = true; });
        container.innerHTML = html;
        container.querySelectorAll("details").forEach(function (d, i) { if (open[i]) { d.open = true; } });
        wire(container, kept);
      });
  }

  // -- the history table: earlier events on demand, kept across live refreshes ----------
  var earlierLoaded = false;
  var earlierBefore = null;  // the seq to read before next
  var earlierDone = false;

  function pad(n) { return (n < 10 ? "0" : "") + n; }

  function when(ts) {
    var d = new Date(ts * 1000);
    return d.getFullYear() + "-" + pad(d.getMonth() + 1) + "-" + pad(d.getDate()) + " " +
      pad(d.getHours()) + ":" + pad(d.getMinutes()) + ":" + pad(d.getSeconds());
  }

  function cell(row, text) {
    var td = document.createElement("td");
    if (text !== null) { td.textContent = text; }
    row.appendChild(td);
    return td;
  }

  function eventRow(ev, failedKinds) {
    var detail = ev.detail || {};
    var error = typeof detail.error === "string" ? detail.error : null;
    var tr = document.createElement("tr");
    tr.className = "ev" + (failedKinds.indexOf(ev.kind) >= 0 || detail.error ? " failure" : "");
    cell(tr, String(ev.seq));
    cell(tr, when(ev.ts));
    cell(tr, ev.kind);
    cell(tr, (ev.step || "") + (ev.phase === "compensate" ? " ↩" : ""));
    cell(tr, ev.attempt ? String(ev.attempt) : "");
    var td = cell(tr, null);
    if (error !== null) {
      var details = document.createElement("details");
      var summary = document.createElement("summary");
      summary.textContent = error.split("\n")[0].slice(0, 160);
      var pre = document.createElement("pre");
      pre.textContent = error;
      details.appendChild(summary);
      details.appendChild(pre);
      td.appendChild(details);
    } else if (Object.keys(detail).length) {
      var code = document.createElement("code");
      code.textContent = JSON.stringify(detail, null, 2);
      td.appendChild(code);
    }
    return tr;
  }

  function seqOf(tr) { return parseInt(tr.cells[0].textContent, 10); }

  function showEarlier(root, kept) {
    var button = root.querySelector("#earlier-events");
    var tbody = root.querySelector("#history-rows");
    if (!button || !tbody) { return; }
    var first = tbody.rows.length ? tbody.rows[0] : null;
    var firstSeq = first ? seqOf(first) : Infinity;
    (kept || []).forEach(function (tr) {
      if (seqOf(tr) < firstSeq) { tbody.insertBefore(tr, first); }
    });
    if (earlierDone) { button.parentNode.parentNode.removeChild(button.parentNode); return; }
    if (earlierLoaded) { button.setAttribute("data-before-seq", earlierBefore); }
    button.addEventListener("click", function () {
      var failedKinds = (tbody.parentNode.getAttribute("data-failed-kinds") || "").split(" ");
      var url = button.getAttribute("data-src") + "?limit=200&before_seq=" +
        encodeURIComponent(button.getAttribute("data-before-seq"));
      button.disabled = true;
      fetch(url, { credentials: "same-origin", headers: { "Accept": "application/json" } })
        .then(function (r) { return r.ok ? r.json() : null; })
        .then(function (page) {
          button.disabled = false;
          if (page === null) { return; }
          var rows = page.events.map(function (ev) { return eventRow(ev, failedKinds); });
          var top = tbody.firstChild;
          rows.forEach(function (tr) { tbody.insertBefore(tr, top); });
          earlierLoaded = true;
          earlierBefore = page.next_before_seq;
          var note = root.querySelector("#earlier-note");
          if (note) {
            note.textContent = "the newest " + tbody.rows.length + " events are shown";
          }
          if (earlierBefore === null) {
            earlierDone = true;
            button.parentNode.parentNode.removeChild(button.parentNode);
          } else {
            button.setAttribute("data-before-seq", earlierBefore);
          }
        });
    });
  }

  function wire(root, kept) {
    showEarlier(root, kept);
    root.querySelectorAll("form[data-confirm]").forEach(function (form) {
      form.addEventListener("submit", function (ev) {
        if (!window.confirm(form.getAttribute("data-confirm"))) { ev.preventDefault(); }
      });
    });
    var only = root.querySelector("#failures-only");
    var live = document.getElementById("live-saga");
    if (only && live) {
      only.checked = live.classList.contains("only-failures");
      only.addEventListener("change", function () {
        live.classList.toggle("only-failures", only.checked);
      });
    }
  }

  function liveSaga(container) {
    var header = container.querySelector("#header");
    var seq = header ? header.getAttribute("data-last-seq") : "0";
    if (!window.EventSource || (header && header.getAttribute("data-terminal"))) { return; }
    var source = new EventSource(container.getAttribute("data-stream") + "?after_seq=" + seq);
    var pending = null;
    source.addEventListener("saga_event", function () {
      if (pending) { return; }
      pending = setTimeout(function () {
        pending = null;
        swap(container, container.getAttribute("data-live-src"));
      }, 150);
    });
    source.addEventListener("end", function () {
      source.close();
      swap(container, container.getAttribute("data-live-src"));
    });
  }

  function pollList(container) {
    container.setAttribute("data-live", "polling");
    setInterval(function () {
      if (document.visibilityState === "visible") {
        swap(container, container.getAttribute("data-live-src"));
      }
    }, 3000);
  }

  // The list follows GET /api/v1/sagas/stream; without EventSource, or when the stream
  // fails (refused, or three errors in a row), it polls every 3 s instead.
  function liveList(container) {
    var stream = container.getAttribute("data-stream");
    if (!window.EventSource || !stream) { pollList(container); return; }
    var source = new EventSource(stream);
    var pending = null;
    var errors = 0;
    container.setAttribute("data-live", "stream");
    source.addEventListener("sagas", function () {
      errors = 0;
      if (pending) { return; }
      pending = setTimeout(function () {
        pending = null;
        swap(container, container.getAttribute("data-live-src"));
      }, 150);
    });
    source.addEventListener("error", function () {
      errors += 1;
      if (source.readyState === EventSource.CLOSED || errors >= 3) {
        source.close();
        pollList(container);
      }
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    wire(document);
    var saga = document.getElementById("live-saga");
    if (saga) { liveSaga(saga); }
    var list = document.getElementById("live-list");
    if (list) { liveList(list); }
  });
})();
