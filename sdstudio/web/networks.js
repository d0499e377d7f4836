// The extra-networks panel: cards for checkpoints, LoRAs and embeddings from /api/catalog.
import {$, api, el, say} from "./api.js";
import {toggleInPrompt} from "./generate.js";

let catalog = {checkpoints: [], loras: [], embeddings: [], vaes: []};
let kind = "loras";
let onCheckpoint = () => {};

const escapeRegExp = (text) => text.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");

/** Fetch /api/catalog again and redraw the cards; returns the catalog. */
export async function loadCatalog() {
  catalog = await api("/api/catalog");
  renderCards();
  return catalog;
}

function matches(item, query) {
  return [item.name, item.alias, item.title].some((s) => s && s.toLowerCase().includes(query));
}

function renderCards() {
  const query = $("network-search").value.trim().toLowerCase();
  const items = (catalog[kind] || []).filter((item) => matches(item, query));
  $("cards").replaceChildren(...(items.length ? items.map(card) : [el("p", {class: "note", text: "Nothing here."})]));
}

function problem(item) {
  if (kind === "loras" && item.compatible === false) return item.reason || "incompatible with the loaded model";
  if (kind === "embeddings" && item.loaded === false) return item.reason || "does not fit the loaded model";
  return null;
}

function card(item) {
  const name = kind === "checkpoints" ? item.name : item.alias || item.name;
  const issue = problem(item);
  const tooltip = [item.title || name, item.label, item.activation_text, issue].filter(Boolean).join("\n");
  const node = el("button", {type: "button", class: issue ? "card incompatible" : "card", title: tooltip,
                             "data-name": item.name},
    item.preview_url ? el("img", {src: item.preview_url, alt: "", loading: "lazy"})
                     : el("div", {class: "placeholder", text: name.slice(0, 1).toUpperCase()}),
    el("span", {class: "card-name", text: name}));
  if (issue) node.append(el("span", {class: "badge", text: "incompatible", title: issue}));
  if (item.demo) node.append(el("span", {class: "badge demo", text: "demo"}));
  node.addEventListener("click", () => use(item));
  return node;
}

function use(item) {
  if (kind === "checkpoints") return onCheckpoint(item.title);
  if (kind === "loras") {
    const weight = item.preferred_weight || 1;
    const tag = `<lora:${item.name}:${weight}>`;
    const text = item.activation_text ? `${tag} ${item.activation_text}` : tag;
    return toggleInPrompt(text, new RegExp(`<lora:${escapeRegExp(item.name)}:[^>]*>`));
  }
  return toggleInPrompt(item.name, new RegExp(`(^|\\s)${escapeRegExp(item.name)}(?=\\s|$)`));
}

/** Wire the panel; `selectCheckpoint(title)` is called when a checkpoint card is clicked. */
export function initNetworks(selectCheckpoint) {
  onCheckpoint = selectCheckpoint;
  for (const button of $("network-tabs").children) {
    button.addEventListener("click", () => {
      kind = button.dataset.kind;
      for (const other of $("network-tabs").children) other.classList.toggle("active", other === button);
      renderCards();
    });
  }
  $("network-search").addEventListener("input", renderCards);
  $("refresh-networks").addEventListener("click", async () => {
    try {
      await Promise.all(["checkpoints", "loras", "embeddings"].map((what) => api(`/sdapi/v1/refresh-${what}`, {})));
      await loadCatalog();
      say("Model lists refreshed");
    } catch (error) {
      say(error.message, true);
    }
  });
}
