/* ai-worker console: progressive enhancement only; every page works without this file.
 * - forms with data-confirm ask before they submit;
 * - a page whose <main> has data-live-url polls that URL (every data-live-ms, or three times as long as
 *   the last answer took when the server is slow; paused while the tab is hidden; backing off on errors)
 *   and swaps in the server-rendered fragments it returns for the elements marked data-live-part; it
 *   sends the version it shows (data-live-version) so an unchanged world costs one small read; it stops
 *   once the answer says done (the world has ended).
 */
(function () {
  "use strict";

  document.addEventListener("submit", function (event) {
    var form = event.target;
    if (form instanceof HTMLFormElement && form.dataset.confirm && !window.confirm(form.dataset.confirm)) {
      event.preventDefault();
    }
  });

  var main = document.querySelector("main[data-live-url]");
  if (!main || main.dataset.liveDone === "true" || !window.fetch) {
    return;
  }
  var url = main.dataset.liveUrl;
  var version = main.dataset.liveVersion || "";
  var every = Math.max(1000, parseInt(main.dataset.liveMs, 10) || 2000);
  var last = {};
  var timer = null;
  var busy = false;
  var failures = 0;

  function schedule(ms) {
    timer = window.setTimeout(tick, ms);
  }

  function apply(parts) {
    Object.keys(parts).forEach(function (name) {
      var el = main.querySelector('[data-live-part="' + name + '"]');
      var html = parts[name];
      if (el && last[name] !== html) {
        last[name] = html;
        el.innerHTML = html; // fragments rendered (and escaped) by the server's templates
      }
    });
  }

  function tick() {
    timer = null;
    if (document.hidden) {
      return; // resumed by visibilitychange
    }
    busy = true;
    var started = Date.now();
    var target = version ? url + (url.indexOf("?") < 0 ? "?" : "&") + "v=" + encodeURIComponent(version) : url;
    fetch(target, { headers: { Accept: "application/json" }, cache: "no-store", credentials: "same-origin" })
      .then(function (response) {
        if (!response.ok) {
          throw new Error("HTTP " + response.status);
        }
        return response.json();
      })
      .then(function (answer) {
        failures = 0;
        apply(answer.parts || {});
        if (answer.version) {
          version = answer.version;
        }
        main.dataset.liveTicks = String((parseInt(main.dataset.liveTicks || "0", 10) || 0) + 1);
        if (answer.done) {
          main.dataset.liveDone = "true";
        } else {
          schedule(Math.max(every, 3 * (Date.now() - started)));
        }
      })
      .catch(function () {
        failures += 1;
        schedule(Math.min(30000, every * Math.pow(2, failures)));
      })
      .then(function () {
        busy = false;
      });
  }

  document.addEventListener("visibilitychange", function () {
    if (!document.hidden && timer === null && !busy && main.dataset.liveDone !== "true") {
      tick();
    }
  });
  schedule(every);
})();
