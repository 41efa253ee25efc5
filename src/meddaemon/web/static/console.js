// The console's few lines of script: the heatmap opacity slider, and pictures that cannot be shown hidden.
(function () {
  "use strict";
  function setOpacity(slider) {
    var value = Number(slider.value) / 100;
    document.querySelectorAll(".overlay .layer").forEach(function (layer) { layer.style.opacity = value; });
  }
  document.addEventListener("input", function (event) {
    if (event.target.matches && event.target.matches("[data-opacity]")) { setOpacity(event.target); }
  });
  document.addEventListener("error", function (event) {
    if (event.target.tagName === "IMG") { event.target.style.visibility = "hidden"; }
  }, true);
})();
