/*
 * The hello page: shows that the "site" JavaScript group has loaded and run.
 */

window.site.ready(function markReady() {
  var status = document.getElementById("js-status");
  if (status === null) {
    return;
  }
  // The browser test looks for both: the attribute and the text.
  status.dataset.state = "ready";
  status.textContent = "JavaScript: the site bundle ran.";
  document.documentElement.dataset.js = "ready";
});
