/*
 * A first file of the "site" JavaScript group (settings, PIPELINE): every file matching
 * "js/lib/*.js" comes before js/hello.js in the bundle. In production pipeline wraps the whole
 * group in one function, so top-level names stay out of the page's global scope; share what
 * other files need through window.
 */

window.site = window.site || {};

/**
 * Run `callback` once the document is parsed (at once if it already is).
 */
window.site.ready = function ready(callback) {
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", callback, { once: true });
  } else {
    callback();
  }
};
