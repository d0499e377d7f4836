// Entry point: tabs, checkpoint/VAE pickers, keyboard. The page is only a client of the HTTP API; every text
// from the server is shown with textContent (never as HTML). Plain ES modules, no build step, works offline.
import {$, api, say} from "./api.js";
import {generate, initGenerate, setMode} from "./generate.js";
import {initNetworks, loadCatalog} from "./networks.js";
import {initPages, loadHistory, loadSettings} from "./pages.js";

const DEFAULT_SAMPLER = "DPM++ 2M";

/** Show one tab: txt2img and img2img share the generation panel. */
function showTab(name) {
  for (const button of $("tabs").children) button.classList.toggle("active", button.dataset.tab === name);
  const panel = name === "txt2img" || name === "img2img" ? "generate" : name;
  for (const section of document.querySelectorAll("main > .panel")) section.hidden = section.id !== `panel-${panel}`;
  if (panel === "generate") setMode(name);
  if (name === "history") loadHistory();
  if (name === "settings") loadSettings().catch((error) => say(error.message, true));
}

function fillSelect(select, values, current) {
  select.replaceChildren(...values.map((v) => new Option(v, v)));
  if (current !== undefined && values.includes(current)) select.value = current;
}

async function loadModels() {
  const [models, vaes, options] = await Promise.all(
    [api("/sdapi/v1/sd-models"), api("/sdapi/v1/sd-vae"), api("/sdapi/v1/options")]);
  fillSelect($("model"), models.map((m) => m.title), options.sd_model_checkpoint);
  fillSelect($("vae"), ["Automatic", "None", ...vaes.map((v) => v.model_name)], options.sd_vae);
  return options.sd_model_checkpoint;
}

async function loadSamplers() {
  const [samplers, schedulers] = await Promise.all([api("/sdapi/v1/samplers"), api("/sdapi/v1/schedulers")]);
  fillSelect($("sampler_name"), samplers.map((s) => s.name), DEFAULT_SAMPLER);
  const labels = schedulers.map((s) => s.label);
  fillSelect($("scheduler"), labels.includes("Automatic") ? labels : ["Automatic", ...labels], "Automatic");
}

/** Catalog (cards, badges) and the demo-model note for the checkpoint now selected. */
async function refreshCatalog() {
  const catalog = await loadCatalog();
  const current = catalog.checkpoints.find((c) => c.title === $("model").value);
  $("model-note").textContent = current && current.demo
    ? "Demo model with random weights: put real checkpoints in models/Stable-diffusion" : "";
}

/** Load a checkpoint on the server (A1111: changing the picker loads it at once). */
async function selectCheckpoint(title) {
  const previous = (await api("/sdapi/v1/options")).sd_model_checkpoint;
  $("model").value = title;
  say(`Loading ${title}…`);
  try {
    await api("/sdapi/v1/options", {sd_model_checkpoint: title});
    await refreshCatalog();
    say(`Loaded ${title}`);
  } catch (error) {
    $("model").value = previous;
    say(error.message, true);
  }
}

async function selectVae(name) {
  say(`Loading VAE ${name}…`);
  try {
    await api("/sdapi/v1/options", {sd_vae: name});
    say(`VAE: ${name}`);
  } catch (error) {
    say(error.message, true);
    await loadModels();
  }
}

async function refreshList(what) {
  try {
    await api(`/sdapi/v1/refresh-${what}`, {});
    await loadModels();
    await refreshCatalog();
    say("Lists refreshed");
  } catch (error) {
    say(error.message, true);
  }
}

function wire() {
  for (const button of $("tabs").children) button.addEventListener("click", () => showTab(button.dataset.tab));
  $("model").addEventListener("change", () => selectCheckpoint($("model").value));
  $("vae").addEventListener("change", () => selectVae($("vae").value));
  $("refresh-models").addEventListener("click", () => refreshList("checkpoints"));
  $("refresh-vae").addEventListener("click", () => refreshList("vae"));
  document.addEventListener("keydown", (e) => {
    if ((e.ctrlKey || e.metaKey) && e.key === "Enter" && !$("panel-generate").hidden) {
      e.preventDefault();
      generate();
    }
  });
  initGenerate();
  initNetworks(selectCheckpoint);
  initPages(showTab);
}

async function start() {
  wire();
  showTab("txt2img");
  try {
    const [loaded] = await Promise.all([loadModels(), loadSamplers()]);
    // like A1111 at startup, load a checkpoint so LoRA/embedding badges describe a real model
    if (!loaded && $("model").value) await selectCheckpoint($("model").value);
    else await refreshCatalog();
    document.body.dataset.ready = "true";
  } catch (error) {
    say(error.message, true);
  }
}

start();
