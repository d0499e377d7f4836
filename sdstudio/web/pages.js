// The PNG Info, History and Settings tabs.
import {$, api, debounce, dropZone, el, readDataURL, say} from "./api.js";
import {fillFields, setInitImage, track} from "./generate.js";

const HISTORY_PAGE = 20;

/** A1111 png-info "parameters" (Prompt, Steps, Size-1...) as request-style form fields. */
function fieldsFromParameters(p) {
  return {prompt: p.Prompt, negative_prompt: p["Negative prompt"], steps: p.Steps, sampler_name: p.Sampler,
          scheduler: p["Schedule type"], cfg_scale: p["CFG scale"], seed: p.Seed, width: p["Size-1"],
          height: p["Size-2"], batch_size: p["Batch size"]};
}

// --- PNG Info -------------------------------------------------------------------------------------------

const png = {parameters: null, image: null};

async function readPng(file) {
  try {
    png.image = await readDataURL(file);
    $("png-preview").src = png.image;
    $("png-preview").hidden = false;
    const result = await api("/sdapi/v1/png-info", {image: png.image});
    png.parameters = result.info ? result.parameters : null;
    $("png-text").textContent = result.info || "No generation parameters in this image.";
    $("png-params").replaceChildren(...Object.entries(png.parameters || {}).map(([key, value]) =>
      el("tr", {}, el("th", {text: key}), el("td", {text: String(value)}))));
    $("png-to-txt2img").disabled = $("png-to-img2img").disabled = !png.parameters;
  } catch (error) {
    say(error.message, true);
  }
}

function initPngInfo(showTab) {
  dropZone($("png-drop"), $("png-file"), (file) => readPng(file));
  $("png-to-txt2img").addEventListener("click", () => {
    fillFields(fieldsFromParameters(png.parameters));
    showTab("txt2img");
  });
  $("png-to-img2img").addEventListener("click", () => {
    fillFields(fieldsFromParameters(png.parameters));
    setInitImage(png.image);
    showTab("img2img");
  });
}

// --- History --------------------------------------------------------------------------------------------

let historyOffset = 0;
let historyTabs = () => {};

/** Load the first page of history for the search box's text (or append the next page when `more`). */
export async function loadHistory(more = false) {
  historyOffset = more ? historyOffset + HISTORY_PAGE : 0;
  const query = new URLSearchParams({q: $("history-search").value, limit: HISTORY_PAGE, offset: historyOffset});
  try {
    const {items, total} = await api(`/api/history?${query}`);
    const rows = items.map(historyRow);
    if (more) $("history-list").append(...rows);
    else $("history-list").replaceChildren(...rows);
    $("history-total").textContent = `${total} image${total === 1 ? "" : "s"}`;
    $("history-more").hidden = historyOffset + items.length >= total;
  } catch (error) {
    say(error.message, true);
  }
}

function historyRow(item) {
  const when = new Date(item.time * 1000).toLocaleString();
  const rerun = el("button", {type: "button", class: "rerun", text: "Re-run"});
  const send = el("button", {type: "button", text: "Send to txt2img"});
  const row = el("article", {class: "history-item", "data-id": item.id},
    item.image_url ? el("img", {src: item.image_url, alt: "", loading: "lazy"}) : el("div", {class: "placeholder"}),
    el("div", {class: "history-text"},
      el("p", {class: "history-prompt", text: item.prompt}),
      item.negative_prompt ? el("p", {class: "note", text: `Negative: ${item.negative_prompt}`}) : "",
      el("p", {class: "note", text: `${when} · seed ${item.seed} · ${item.model || "unknown model"}`}),
      el("div", {class: "actions"}, rerun, send)));
  rerun.addEventListener("click", async () => {
    try {
      const {job_id: jobId} = await api(`/api/history/${item.id}/rerun`, {});
      historyTabs("txt2img");
      await track(jobId);
      loadHistory();
    } catch (error) {
      say(error.message, true);
    }
  });
  send.addEventListener("click", () => {
    fillFields({...item.params, seed: item.seed});
    historyTabs("txt2img");
  });
  return row;
}

function initHistory(showTab) {
  historyTabs = showTab;
  $("history-search").addEventListener("input", debounce(() => loadHistory(), 300));
  $("history-more").addEventListener("click", () => loadHistory(true));
}

// --- Settings -------------------------------------------------------------------------------------------

/** Put the server's current options into the settings form. */
export async function loadSettings() {
  const options = await api("/sdapi/v1/options");
  for (const input of $("settings-form").elements) {
    if (!input.name || !(input.name in options)) continue;
    if (input.type === "checkbox") input.checked = Boolean(options[input.name]);
    else input.value = options[input.name];
  }
}

async function saveSettings(event) {
  event.preventDefault();
  const changes = {};
  for (const input of $("settings-form").elements) {
    if (!input.name) continue;
    changes[input.name] = input.type === "checkbox" ? input.checked
      : input.type === "number" ? Number(input.value) : input.value;
  }
  try {
    await api("/sdapi/v1/options", changes);
    say("Settings applied");
  } catch (error) {
    say(error.message, true);
  }
}

/** Wire the three tabs; `showTab(name)` switches tabs. */
export function initPages(showTab) {
  initPngInfo(showTab);
  initHistory(showTab);
  $("settings-form").addEventListener("submit", saveSettings);
}
