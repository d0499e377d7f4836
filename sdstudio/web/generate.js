// The txt2img/img2img form: request body, job submission and polling, progress, gallery, token counters.
import {$, api, debounce, dropZone, el, readDataURL, say} from "./api.js";

const NUMBER_FIELDS = ["steps", "cfg_scale", "width", "height", "seed", "batch_size", "n_iter"];
const FORM_FIELDS = ["prompt", "negative_prompt", "sampler_name", "scheduler", ...NUMBER_FIELDS, "denoising_strength"];
const FINISHED = ["done", "failed", "interrupted"];
const POLL_MS = 250;
const state = {mode: "txt2img", initImage: null, results: [], shown: -1, job: null};

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Switch the form between "txt2img" and "img2img". */
export function setMode(mode) {
  state.mode = mode;
  document.body.dataset.mode = mode;
}

/** Use a data: URL as img2img's init image. */
export function setInitImage(dataURL) {
  state.initImage = dataURL;
  $("init-preview").src = dataURL;
  $("init-preview").hidden = false;
}

function requestBody() {
  const body = {mode: state.mode};
  for (const id of ["prompt", "negative_prompt", "sampler_name", "scheduler"]) body[id] = $(id).value;
  for (const id of NUMBER_FIELDS) body[id] = Number($(id).value);
  if (state.mode === "img2img") {
    if (!state.initImage) throw new Error("img2img needs an init image: drop one in the Init image box");
    body.init_images = [state.initImage];
    body.denoising_strength = Number($("denoising_strength").value);
  }
  return body;
}

/** Queue a job from the form and follow it to the end (one job at a time from this page). */
export async function generate() {
  if (state.job) return;
  try {
    const {job_id: jobId} = await api("/api/jobs", requestBody());
    await track(jobId);
  } catch (error) {
    say(error.message, true);
  }
}

/** Poll a queued job until it finishes, showing its progress, preview and results. */
export async function track(jobId) {
  state.job = jobId;
  setBusy(true);
  say("Queued…");
  try {
    for (;;) {
      const job = await api(`/api/jobs/${encodeURIComponent(jobId)}`);
      showProgress(job);
      if (FINISHED.includes(job.status)) return finish(job);
      await sleep(POLL_MS);
    }
  } finally {
    state.job = null;
    setBusy(false);
  }
}

function setBusy(busy) {
  $("generate").disabled = busy;
  $("interrupt").disabled = !busy;
  $("skip").disabled = !busy;
  $("progress").hidden = !busy;
  document.body.classList.toggle("busy", busy);
}

function showProgress(job) {
  const fraction = job.steps ? job.step / job.steps : 0;
  $("progress-bar").style.width = `${Math.round(fraction * 100)}%`;
  const eta = job.eta ? ` · ETA ${job.eta.toFixed(1)} s` : "";
  $("progress-text").textContent =
    job.status === "queued" ? "Waiting in queue…" : `Step ${job.step}/${job.steps}${eta}`;
  if (job.preview) $("main-image").src = "data:image/png;base64," + job.preview;
}

function finish(job) {
  const images = job.images || [];
  if (images.length) {
    state.results = images.map((b64, i) => ({src: "data:image/png;base64," + b64, infotext: job.infotexts[i] || ""}));
    renderGallery();
    showResult(0);
  }
  const warnings = (job.warnings || []).join("; ");
  if (job.status === "failed") say(job.error || "Generation failed", true);
  else if (job.status === "interrupted") say("Interrupted");
  else if (warnings) say(`Done with warnings: ${warnings}`, true);
  else say(`Done: ${images.length} image${images.length === 1 ? "" : "s"}`);
}

function renderGallery() {
  $("gallery").replaceChildren(...state.results.map((result, i) => {
    const thumb = el("button", {type: "button", class: "thumb", title: `Image ${i + 1}`},
                     el("img", {src: result.src, alt: ""}));
    thumb.addEventListener("click", () => showResult(i));
    return thumb;
  }));
  $("gallery").hidden = state.results.length < 2;
}

function showResult(i) {
  state.shown = i;
  $("main-image").src = state.results[i].src;
  $("infotext").textContent = state.results[i].infotext;
  [...$("gallery").children].forEach((thumb, j) => thumb.classList.toggle("selected", i === j));
}

/** The seed written in the shown image's infotext, or null. */
function shownSeed() {
  const result = state.results[state.shown];
  const match = result && /(?:^|, )Seed: (\d+)/m.exec(result.infotext);
  return match ? match[1] : null;
}

/** Fill the form from request-style fields (prompt, negative_prompt, steps, sampler_name, ...); others are ignored. */
export function fillFields(fields) {
  for (const id of FORM_FIELDS) {
    const value = fields[id];
    if (value === undefined || value === null) continue;
    const input = $(id);
    if (input.tagName === "SELECT" && ![...input.options].some((o) => o.value === String(value))) continue;
    input.value = value;
    input.dispatchEvent(new Event("input"));
  }
}

/** Toggle `text` in the prompt: remove what `pattern` matches if present, else append `text`. */
export function toggleInPrompt(text, pattern) {
  const prompt = $("prompt");
  if (pattern.test(prompt.value)) {
    prompt.value = prompt.value.replace(pattern, "").replace(/ {2,}/g, " ").trim();
  } else {
    const current = prompt.value.trimEnd();
    prompt.value = current ? `${current} ${text}` : text;
  }
  prompt.dispatchEvent(new Event("input"));
}

async function countTokens(id) {
  try {
    const {used, capacity} = await api("/api/tokens", {text: $(id).value});
    $(`count-${id}`).textContent = `${used}/${capacity}`;
    $(`count-${id}`).classList.toggle("over", used > 75);
  } catch (error) {
    $(`count-${id}`).textContent = "?/75";
  }
}

/** Wire the form's controls. */
export function initGenerate() {
  $("form").addEventListener("submit", (e) => { e.preventDefault(); generate(); });
  $("interrupt").addEventListener("click", () => api("/sdapi/v1/interrupt", {}).catch((e) => say(e.message, true)));
  $("skip").addEventListener("click", () => api("/sdapi/v1/skip", {}).catch((e) => say(e.message, true)));
  $("seed-random").addEventListener("click", () => { $("seed").value = -1; });
  $("seed-reuse").addEventListener("click", () => { $("seed").value = shownSeed() ?? -1; });
  $("denoising_strength").addEventListener("input", () => {
    $("denoise-value").textContent = $("denoising_strength").value;
  });
  dropZone($("init-drop"), $("init-file"), async (file) => setInitImage(await readDataURL(file)));
  for (const id of ["prompt", "negative_prompt"]) {
    $(id).addEventListener("input", debounce(() => countTokens(id), 300));
    countTokens(id);
  }
}
