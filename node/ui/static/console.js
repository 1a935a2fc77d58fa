// The console works without JavaScript; this only adds a confirmation before destructive
// actions and fills the path field from the file picker without a page load.
document.addEventListener("submit", (event) => {
  const text = event.target.dataset.confirm;
  if (text && !window.confirm(text)) event.preventDefault();
});
document.addEventListener("click", (event) => {
  const link = event.target.closest("a.use");
  const field = document.getElementById("ds-path");
  if (link && field) {
    event.preventDefault();
    field.value = link.dataset.path;
    field.focus();
  }
});
