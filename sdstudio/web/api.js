// Small helpers shared by the page's modules. Data from the server is only ever placed with textContent
// or as attribute values (src, title), never parsed as HTML.
export const $ = (id) => document.getElementById(id);

/** GET (no body) or POST JSON to the server; a non-2xx answer throws an Error carrying the server's detail. */
export async function api(path, body) {
  const init = body === undefined ? {} : {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)};
  const response = await fetch(path, init);
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const detail = typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail ?? data);
    throw new Error(`${response.status}: ${detail || response.statusText}`);
  }
  return data;
}

/** An element with text content and attributes (`class`, `title`, `src`, `hidden`...). */
export function el(tag, {text, ...attrs} = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === false || value === null || value === undefined) continue;
    node.setAttribute(name, value === true ? "" : value);
  }
  if (text !== undefined) node.textContent = text;
  node.append(...children);
  return node;
}

/** Show a one-line message (an error when `error`) in the status bar. */
export function say(message, error = false) {
  $("status").textContent = message;
  $("status").classList.toggle("error", error);
}

/** Run `fn` after the caller has been quiet for `ms` milliseconds. */
export function debounce(fn, ms) {
  let timer;
  return (...args) => { clearTimeout(timer); timer = setTimeout(() => fn(...args), ms); };
}

/** A File as a data: URL (base64). */
export function readDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

/** Wire a drop zone and its file input to `onFile(file)`. */
export function dropZone(zone, input, onFile) {
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    if (e.dataTransfer.files.length) onFile(e.dataTransfer.files[0]);
  });
  input.addEventListener("change", () => { if (input.files.length) onFile(input.files[0]); });
}
