/* clickpulse.js: the first-party tracking script served by the clickpulse collector (GET /v1/clickpulse.js).
 * API and snippet: docs/collector.md. Sends Segment-style events to <host>/v1/batch; no dependencies. */
(function (window, document) {
  "use strict";
  var VERSION = "1.0.0";
  var ANON_KEY = "clickpulse_anonymous_id";
  var USER_KEY = "clickpulse_user_id";
  var BEACON_MAX = 60000; // sendBeacon payloads over 64 KiB are refused by browsers

  var stub = window.clickpulse;
  var queued = Array.isArray(stub) ? stub.slice() : []; // calls the snippet's stub recorded
  var pending = []; // events made before load()

  var cfg = null;
  var buffer = [];
  var timer = null;
  var inFlight = null;
  var backoffMs = 0;
  var userId = null;
  var anonId = null;

  function store(key, value) {
    try {
      if (value === null) window.localStorage.removeItem(key);
      else window.localStorage.setItem(key, value);
    } catch (e) { /* storage disabled: ids live for this page only */ }
  }
  function stored(key) {
    try { return window.localStorage.getItem(key); } catch (e) { return null; }
  }
  function uuid() {
    if (window.crypto && window.crypto.randomUUID) return window.crypto.randomUUID();
    var b = new Uint8Array(16);
    if (window.crypto && window.crypto.getRandomValues) window.crypto.getRandomValues(b);
    else for (var i = 0; i < 16; i++) b[i] = Math.floor(Math.random() * 256);
    b[6] = (b[6] & 0x0f) | 0x40; b[8] = (b[8] & 0x3f) | 0x80;
    var h = Array.prototype.map.call(b, function (x) { return (x + 0x100).toString(16).slice(1); }).join("");
    return h.slice(0, 8) + "-" + h.slice(8, 12) + "-" + h.slice(12, 16) + "-" + h.slice(16, 20) + "-" + h.slice(20);
  }
  function anonymousId() {
    if (!anonId) {
      anonId = stored(ANON_KEY);
      if (!anonId) { anonId = uuid(); store(ANON_KEY, anonId); }
    }
    return anonId;
  }
  function pageContext() {
    var loc = window.location;
    return {
      url: loc.href,
      path: loc.pathname,
      search: loc.search,
      referrer: document.referrer || null,
      title: document.title
    };
  }
  function base(type) {
    return {
      type: type,
      messageId: uuid(),
      anonymousId: anonymousId(),
      userId: userId,
      timestamp: new Date().toISOString(),
      context: {
        page: pageContext(),
        userAgent: window.navigator.userAgent,
        locale: window.navigator.language || null,
        library: { name: "clickpulse.js", version: VERSION }
      }
    };
  }
  function enqueue(msg) {
    if (!cfg) { pending.push(msg); return; }
    buffer.push(msg);
    if (buffer.length >= cfg.flushAt) flush();
    else if (!timer) timer = window.setTimeout(flush, cfg.flushInterval);
  }
  function body(batch, withKey) {
    var doc = { batch: batch, sentAt: new Date().toISOString() };
    if (withKey) doc.writeKey = cfg.writeKey;
    return JSON.stringify(doc);
  }
  function retry(batch) {
    buffer = batch.concat(buffer).slice(-cfg.maxQueue);
    backoffMs = Math.min(backoffMs ? backoffMs * 2 : 1000, 60000);
    if (timer) window.clearTimeout(timer);
    timer = window.setTimeout(flush, backoffMs);
  }

  /* Send what is buffered to /v1/batch; resolves when the collector answered (failed sends are retried). */
  function flush() {
    if (timer) { window.clearTimeout(timer); timer = null; }
    if (!cfg || !buffer.length) return inFlight || Promise.resolve();
    if (inFlight) return inFlight.then(flush);
    var batch = buffer.splice(0, cfg.flushAt);
    inFlight = window.fetch(cfg.host + "/v1/batch", {
      method: "POST",
      mode: "cors",
      credentials: "omit",
      keepalive: true,
      headers: { "Content-Type": "application/json", "Authorization": "Basic " + window.btoa(cfg.writeKey + ":") },
      body: body(batch, false)
    }).then(function (res) {
      if (res.status === 429 || res.status >= 500) retry(batch);
      else { backoffMs = 0; if (!res.ok && window.console) window.console.warn("clickpulse: " + res.status + " from collector"); }
    }, function () { retry(batch); }).then(function () {
      inFlight = null;
      if (buffer.length && !timer) timer = window.setTimeout(flush, backoffMs || 0);
    });
    return inFlight;
  }

  /* On pagehide: hand everything buffered to navigator.sendBeacon (the write key in body and query). */
  function beacon() {
    if (!cfg || !buffer.length) return;
    if (!window.navigator.sendBeacon) { flush(); return; }
    var url = cfg.host + "/v1/batch?writeKey=" + encodeURIComponent(cfg.writeKey);
    var batch = buffer.splice(0, buffer.length);
    while (batch.length) {
      var n = batch.length;
      var payload = body(batch.slice(0, n), true);
      while (payload.length > BEACON_MAX && n > 1) { n = Math.ceil(n / 2); payload = body(batch.slice(0, n), true); }
      if (!window.navigator.sendBeacon(url, payload)) { buffer = batch.concat(buffer); return; }
      batch = batch.slice(n);
    }
  }

  function track(event, properties) {
    var m = base("track"); m.event = String(event); m.properties = properties || {}; enqueue(m);
  }
  function page(name, properties) {
    if (typeof name === "object" && name !== null) { properties = name; name = null; }
    var m = base("page"); if (name) m.name = String(name);
    var p = pageContext();
    m.properties = Object.assign({ url: p.url, path: p.path, referrer: p.referrer, title: p.title }, properties || {});
    enqueue(m);
  }
  function identify(id, traits) {
    if (typeof id === "object" && id !== null) { traits = id; id = null; }
    if (id !== null && id !== undefined) { userId = String(id); store(USER_KEY, userId); }
    var m = base("identify"); m.traits = traits || {}; enqueue(m);
  }
  function alias(id, previousId) {
    var m = base("alias"); m.userId = String(id); m.previousId = String(previousId || userId || anonymousId());
    userId = String(id); store(USER_KEY, userId); enqueue(m);
  }
  function reset() {
    userId = null; anonId = null; store(USER_KEY, null); store(ANON_KEY, null);
  }

  function onClick(e) {
    var el = e.target;
    while (el && el.nodeType === 1 && !(el.tagName === "A" && el.hasAttribute("href"))) el = el.parentNode;
    if (!el || el.nodeType !== 1) return;
    var text = (el.innerText || el.textContent || "").replace(/\s+/g, " ").trim().slice(0, 256);
    track("Link Clicked", { href: el.href, text: text });
  }
  function hookHistory() {
    var last = window.location.href;
    function changed() { if (window.location.href !== last) { last = window.location.href; page(); } }
    ["pushState", "replaceState"].forEach(function (name) {
      var orig = window.history[name];
      window.history[name] = function () { var r = orig.apply(this, arguments); changed(); return r; };
    });
    window.addEventListener("popstate", changed);
  }

  function load(options) {
    if (cfg) return api;
    if (!options || !options.writeKey) throw new Error("clickpulse.load needs {writeKey, host}");
    cfg = {
      writeKey: String(options.writeKey),
      host: String(options.host || "").replace(/\/+$/, ""),
      flushAt: options.flushAt || 20,
      flushInterval: options.flushInterval || 2000,
      maxQueue: options.maxQueue || 1000,
      autoPage: options.autoPage !== false,
      trackLinks: options.trackLinks !== false
    };
    userId = stored(USER_KEY);
    anonymousId();
    pending.splice(0).forEach(enqueue);
    if (cfg.trackLinks) document.addEventListener("click", onClick, true);
    window.addEventListener("pagehide", beacon);
    window.addEventListener("beforeunload", beacon);
    document.addEventListener("visibilitychange", function () { if (document.visibilityState === "hidden") beacon(); });
    if (cfg.autoPage) { page(); hookHistory(); }
    return api;
  }

  var api = {
    loaded: true,
    VERSION: VERSION,
    load: load,
    track: track,
    page: page,
    identify: identify,
    alias: alias,
    flush: flush,
    reset: reset,
    anonymousId: anonymousId,
    userId: function () { return userId; }
  };
  window.clickpulse = api;

  // replay what the snippet's stub recorded before this script arrived (load first)
  var calls = queued.filter(function (c) { return Array.isArray(c) && c[0] === "load"; })
    .concat(queued.filter(function (c) { return Array.isArray(c) && c[0] !== "load"; }));
  calls.forEach(function (c) {
    if (typeof api[c[0]] === "function") api[c[0]].apply(api, c.slice(1));
  });
})(window, document);
