// The page is only a client of the API; every text from the server is shown with textContent, never as HTML.
const $ = (id) => document.getElementById(id);

async function api(path, body) {
  const response = await fetch(path, body === undefined ? {} : {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
  const data = await response.json();
  if (!response.ok) throw new Error(data.detail || response.statusText);
  return data;
}

async function loadLists() {
  const [models, samplers, options] = await Promise.all(
    [api("/sdapi/v1/sd-models"), api("/sdapi/v1/samplers"), api("/sdapi/v1/options")]);
  $("model").replaceChildren(...models.map((m) => new Option(m.title, m.title)));
  if (options.sd_model_checkpoint) $("model").value = options.sd_model_checkpoint;
  $("sampler_name").replaceChildren(...samplers.map((s) => new Option(s.name, s.name)));
  $("sampler_name").value = "DPM++ 2M";
  $("model-note").textContent = models.some((m) => m.title.startsWith("demo-random-weights"))
    ? "(demo model with random weights: put real checkpoints in models/Stable-diffusion)" : "";
}

async function countTokens(field) {
  const {used, capacity} = await api("/api/tokens", {text: $(field).value});
  $(field === "prompt" ? "count-prompt" : "count-negative").textContent = `${used}/${capacity}`;
}

async function pollProgress() {
  const p = await api("/sdapi/v1/progress");
  $("progress").value = p.progress;
  if (p.current_image) $("image").src = "data:image/png;base64," + p.current_image;
}

async function generate(event) {
  event.preventDefault();
  $("generate").disabled = true;
  $("infotext").classList.remove("error");
  const timer = setInterval(pollProgress, 1000);
  try {
    await api("/sdapi/v1/options", {sd_model_checkpoint: $("model").value});
    const body = {};
    for (const id of ["prompt", "negative_prompt", "sampler_name"]) body[id] = $(id).value;
    for (const id of ["steps", "cfg_scale", "width", "height", "seed"]) body[id] = Number($(id).value);
    const result = await api("/sdapi/v1/txt2img", body);
    const info = JSON.parse(result.info);
    if (result.images.length) $("image").src = "data:image/png;base64," + result.images[0];
    $("infotext").textContent = info.infotexts[0] || "interrupted";
    $("progress").value = 1;
  } catch (error) {
    $("infotext").textContent = error.message;
    $("infotext").classList.add("error");
  } finally {
    clearInterval(timer);
    $("generate").disabled = false;
  }
}

$("form").addEventListener("submit", generate);
$("interrupt").addEventListener("click", () => api("/sdapi/v1/interrupt", {}));
document.addEventListener("keydown", (e) => { if (e.ctrlKey && e.key === "Enter") $("form").requestSubmit(); });
for (const field of ["prompt", "negative_prompt"]) {
  let timer;
  $(field).addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(() => countTokens(field), 250); });
  countTokens(field);
}
loadLists().catch((error) => { $("infotext").textContent = error.message; });
