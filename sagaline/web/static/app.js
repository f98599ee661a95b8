// sagaline dashboard: confirmations, live updates over server-sent events, filters.
// Plain JavaScript, no build step and no library.
(function () {
  "use strict";

  function swap(container, url) {
    return fetch(url, { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (html) {
        if (html === null) { return; }
        var open = {};
        container.querySelectorAll("details[open]").forEach(function (d, i) { open[i] = true; });
        container.innerHTML = html;
        container.querySelectorAll("details").forEach(function (d, i) { if (open[i]) { d.open = true; } });
        wire(container);
      });
  }

  function wire(root) {
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

  function liveList(container) {
    setInterval(function () {
      if (document.visibilityState === "visible") {
        swap(container, container.getAttribute("data-live-src"));
      }
    }, 3000);
  }

  document.addEventListener("DOMContentLoaded", function () {
    wire(document);
    var saga = document.getElementById("live-saga");
    if (saga) { liveSaga(saga); }
    var list = document.getElementById("live-list");
    if (list) { liveList(list); }
  });
})();
