// slider-cn ui: the page's script. No framework and no build step; it only talks to /api.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));

function el(tag, attrs = {}, ...children) {
  const node = tag === "svg" || tag === "polyline"
    ? document.createElementNS("http://www.w3.org/2000/svg", tag)
    : document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}

const state = {
  schema: null,
  fields: [],            // every config field, in tab order
  configPath: "config.json",
  present: new Set(),    // keys the loaded file sets
  touched: new Set(),    // keys the user changed since
  extra: {},             // keys of the file the schema does not know (sent back: the server says why)
  backends: [],
  backendsDirty: false,
  job: null,
  records: [],
  events: null,
  lastOutputs: 0,
};

// Keys whose change can change the target list.
const TARGET_KEYS = ["slider_lora_target", "model_family", "pretrained_model_name_or_path",
  "training_mode", "controlnet", "controlnet_model_name_or_path"];

// --- talking to the server ----------------------------------------------------------------

async function api(method, url, body) {
  const options = { method, headers: { "X-Slider-CN": "1" } };
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(url, options);
  let data = null;
  try { data = await response.json(); } catch (e) { data = null; }
  if (!response.ok) {
    const error = new Error((data && data.detail) || response.statusText);
    error.status = response.status;
    error.data = data;
    throw error;
  }
  return data;
}

const q = (params) => "?" + new URLSearchParams(params).toString();

function notice(text, bad = false) {
  const node = $("#notice");
  node.textContent = text;
  node.className = bad ? "bad" : "good";
}

function debounce(fn, ms) {
  let timer = null;
  return (...args) => { clearTimeout(timer); timer = setTimeout(() => fn(...args), ms); };
}

function dirname(path) {
  const i = path.lastIndexOf("/");
  return i < 0 ? "" : path.slice(0, i);
}

// A path from the config (relative to the config's folder) as a workspace path.
function fromConfig(value) {
  if (!value || value.startsWith("/")) return value;
  const dir = dirname(state.configPath);
  return dir ? dir + "/" + value : value;
}

// --- the config form --------------------------------------------------------------------------

function fieldInput(field, id) {
  const hint = field.default === null || field.default === undefined ? "" : String(field.default);
  if (field.kind === "bool") {
    return el("label", { class: "toggle" },
      el("input", { type: "checkbox", id, role: "switch" }), el("span", { class: "knob" }));
  }
  if (field.kind === "enum") {
    const select = el("select", { id });
    select.append(el("option", { value: "" }, field.required ? "choose" : `default (${hint || "unset"})`));
    for (const choice of field.choices) select.append(el("option", { value: choice }, choice));
    return select;
  }
  if (field.kind === "json") {
    return el("textarea", { id, rows: 2, spellcheck: "false", placeholder: hint || "unset" });
  }
  const numeric = field.kind === "int" || field.kind === "float";
  return el("input", {
    id, spellcheck: "false", placeholder: hint || "unset",
    inputmode: numeric ? (field.kind === "int" ? "numeric" : "decimal") : null,
    list: field.path ? "folder-list" : null,
  });
}

function renderForm() {
  const tabs = $("#config-tabs");
  const panels = $("#config-panels");
  for (const tab of state.schema.tabs) {
    const panel = el("div", { class: "panel hidden", id: "tab-" + tab.name, role: "tabpanel" });
    for (const field of tab.fields) {
      state.fields.push(field);
      const id = "field-" + field.name;
      const input = fieldInput(field, id);
      input.addEventListener(field.kind === "bool" || field.kind === "enum" ? "change" : "input",
        () => onFieldChange(field.name));
      const label = el("label", { for: id, class: "name" }, field.label,
        field.label !== field.name ? el("code", {}, field.name) : null);
      const bounds = Object.entries(field.bounds).map(([k, v]) => `${k} ${v}`).join(", ");
      const defaultText = field.default === null || field.default === undefined
        ? "unset" : JSON.stringify(field.default);
      panel.append(el("div", { class: "field", id: "wrap-" + field.name },
        label, input,
        el("div", { class: "desc" }, field.description,
          el("span", { class: "muted" }, ` (default: ${defaultText}${bounds ? "; " + bounds : ""})`)),
        el("pre", { class: "error", id: "error-" + field.name })));
    }
    if (tab.name === "Data") panel.append(renderBackendEditorShell());
    panels.append(panel);
    tabs.append(el("button", { type: "button", class: "tab", id: "tab-button-" + tab.name,
      "data-tab": tab.name, onclick: () => showTab(tab.name) }, tab.name));
  }
  showTab(state.schema.tabs[0].name);
}

function showTab(name) {
  for (const panel of $$("#config-panels > .panel")) panel.classList.toggle("hidden", panel.id !== "tab-" + name);
  for (const button of $$("#config-tabs .tab")) button.classList.toggle("active", button.dataset.tab === name);
}

function onFieldChange(name) {
  state.touched.add(name);
  scheduleCheck();
  if (TARGET_KEYS.includes(name)) scheduleTargets();
  if (name === "data_backend_config") loadBackends();
}

function formValues() {
  const values = { ...state.extra };
  for (const field of state.fields) {
    const input = $("#field-" + field.name);
    if (field.kind === "bool") {
      if (state.present.has(field.name) || state.touched.has(field.name)) values[field.name] = input.checked;
      continue;
    }
    const text = input.value.trim();
    if (text === "") continue;
    if (field.kind === "int" && /^-?\d+$/.test(text)) values[field.name] = parseInt(text, 10);
    else if (field.kind === "float" && text !== "" && !isNaN(Number(text))) values[field.name] = Number(text);
    else if (field.kind === "json" && /^[[{]/.test(text)) {
      try { values[field.name] = JSON.parse(text); } catch (e) { values[field.name] = text; }
    } else values[field.name] = text;
  }
  return values;
}

function fillForm(values) {
  state.present = new Set(Object.keys(values));
  state.touched = new Set();
  state.extra = {};
  const known = new Set(state.fields.map((f) => f.name));
  for (const [key, value] of Object.entries(values)) if (!known.has(key)) state.extra[key] = value;
  for (const field of state.fields) {
    const input = $("#field-" + field.name);
    const value = values[field.name];
    if (field.kind === "bool") input.checked = value === undefined ? Boolean(field.default) : Boolean(value);
    else if (value === undefined || value === null) input.value = "";
    else if (typeof value === "object") input.value = JSON.stringify(value);
    else input.value = String(value);
  }
}

function showProblems(problems) {
  for (const node of $$("#config-panels pre.error")) node.textContent = "";
  for (const node of $$("#config-tabs .tab")) node.classList.remove("has-error");
  for (const node of $$(".field.invalid")) node.classList.remove("invalid");
  $("#config-errors").textContent = "";
  if (!problems) return;
  for (const [key, lines] of Object.entries(problems.fields || {})) {
    const node = $("#error-" + key);
    if (!node) { $("#config-errors").textContent += lines.join("\n") + "\n"; continue; }
    node.textContent = lines.join("\n");
    $("#wrap-" + key).classList.add("invalid");
    const field = state.fields.find((f) => f.name === key);
    if (field) $("#tab-button-" + field.tab).classList.add("has-error");
  }
  if ((problems.general || []).length) $("#config-errors").textContent += problems.general.join("\n");
  const unknown = Object.keys(state.extra);
  $("#config-drop-unknown").classList.toggle("hidden", !unknown.length);
  $("#config-drop-unknown").textContent = `drop unknown keys: ${unknown.join(", ")}`;
}

function dropUnknownKeys() {
  state.extra = {};
  $("#config-drop-unknown").classList.add("hidden");
  scheduleCheck();
}

async function loadConfig() {
  state.configPath = $("#config-path").value.trim() || "config.json";
  try {
    const data = await api("GET", "/api/config" + q({ path: state.configPath }));
    fillForm(data.values);
    showProblems(data.problems);
    notice(`loaded ${state.configPath}`);
  } catch (error) {
    if (error.status === 404) {
      fillForm({});
      notice(`${state.configPath} does not exist yet: Save writes it`);
    } else {
      notice(error.message, true);
    }
  }
  await loadBackends();
  scheduleTargets();
  refreshOutputs();
}

async function saveConfig() {
  state.configPath = $("#config-path").value.trim() || "config.json";
  if (!(await saveBackends())) return false;
  try {
    await api("PUT", "/api/config", { path: state.configPath, values: formValues() });
    showProblems(null);
    state.present = new Set(Object.keys(formValues()));
    notice(`saved ${state.configPath}`);
    refreshJsonFiles();
    return true;
  } catch (error) {
    if (error.data && error.data.problems) showProblems(error.data.problems);
    notice(`not saved: ${error.message.split("\n")[0]}`, true);
    return false;
  }
}

const scheduleCheck = debounce(async () => {
  try {
    await api("POST", "/api/config/check", { path: state.configPath, values: formValues() });
    showProblems(null);
  } catch (error) {
    if (error.data && error.data.problems) showProblems(error.data.problems);
  }
}, 400);

// --- the dataloader editor ---------------------------------------------------------------

function dataloaderPath() {
  const value = $("#field-data_backend_config").value.trim();
  return fromConfig(value || "multidatabackend.json");
}

function renderBackendEditorShell() {
  return el("div", { id: "backends-editor" },
    el("h3", {}, "Dataset backends ", el("span", { id: "dataloader-path", class: "muted" })),
    el("div", { id: "backends" }),
    el("div", { class: "row" },
      el("button", { type: "button", id: "add-positive", onclick: () => addBackend("plus", 1) }, "+ positive"),
      el("button", { type: "button", id: "add-negative", onclick: () => addBackend("minus", -1) }, "- negative"),
      el("button", { type: "button", id: "add-neutral", onclick: () => addBackend("neutral", null) }, "0 neutral"),
      el("button", { type: "button", id: "add-conditioning", onclick: () => addBackend("cond", null, true) }, "conditioning"),
      el("button", { type: "button", id: "backends-save", onclick: saveBackends }, "Save dataloader")),
    el("pre", { class: "error", id: "backends-errors" }));
}

function uniqueId(base) {
  const ids = new Set(state.backends.map((b) => b.id));
  let i = 1;
  while (ids.has(`${base}-${i}`)) i += 1;
  return `${base}-${i}`;
}

function addBackend(base, strength, conditioning = false) {
  const backend = { id: uniqueId(base), instance_data_dir: "" };
  if (strength !== null) backend.slider_strength = strength;
  if (conditioning) backend.dataset_type = "conditioning";
  state.backends.push(backend);
  state.backendsDirty = true;
  renderBackends();
  const input = $(`#backend-${state.backends.length - 1}-instance_data_dir`);
  if (input) input.focus();
}

function signOf(backend) {
  if (backend.dataset_type === "conditioning") return ["cond", "c"];
  const s = Number(backend.slider_strength || 0);
  return s > 0 ? ["plus", "+"] : s < 0 ? ["minus", "-"] : ["zero", "0"];
}

function parseBackendValue(field, text) {
  if (field.kind === "int" && /^-?\d+$/.test(text)) return parseInt(text, 10);
  if (field.kind === "float" && !isNaN(Number(text))) return Number(text);
  return text;
}

function renderBackends() {
  const box = $("#backends");
  if (!box) return;
  box.textContent = "";
  $("#dataloader-path").textContent = dataloaderPath();
  const ids = $("#conditioning-ids");
  ids.textContent = "";
  for (const b of state.backends) if (b.dataset_type === "conditioning") ids.append(el("option", { value: b.id }));
  state.backends.forEach((backend, index) => {
    const [cls, mark] = signOf(backend);
    const card = el("div", { class: "backend " + cls, id: "backend-" + index },
      el("div", { class: "backend-head" },
        el("span", { class: "sign " + cls }, mark),
        el("strong", {}, backend.id || "(no id)"),
        el("button", { type: "button", class: "remove", title: "remove this backend",
          onclick: () => { state.backends.splice(index, 1); state.backendsDirty = true; renderBackends(); } }, "remove")));
    for (const field of state.schema.backend_fields) {
      if (field.name === "type") continue;
      const id = `backend-${index}-${field.name}`;
      let input;
      if (field.name === "conditioning") {
        input = inlineConditioningInput(backend, index);
      } else if (field.kind === "bool") {
        input = el("input", { type: "checkbox", id });
        input.checked = Boolean(backend[field.name]);
        input.addEventListener("change", () => { backend[field.name] = input.checked; state.backendsDirty = true; });
      } else if (field.kind === "enum") {
        input = el("select", { id }, el("option", { value: "" }, `default (${field.default})`),
          field.choices.map((c) => el("option", { value: c }, c)));
        input.value = backend[field.name] ?? "";
        input.addEventListener("change", () => {
          if (input.value) backend[field.name] = input.value; else delete backend[field.name];
          state.backendsDirty = true;
          if (field.name === "dataset_type") renderBackends();
        });
      } else {
        const list = field.name === "instance_data_dir" ? "folder-list"
          : field.name === "conditioning_data" ? "conditioning-ids" : null;
        input = el("input", { id, list, spellcheck: "false",
          placeholder: field.required ? "required" : (field.default ?? "unset") });
        input.value = backend[field.name] ?? "";
        input.addEventListener("input", () => {
          const text = input.value.trim();
          if (text === "") delete backend[field.name]; else backend[field.name] = parseBackendValue(field, text);
          state.backendsDirty = true;
        });
        if (field.name === "slider_strength" || field.name === "id") input.addEventListener("change", renderBackends);
      }
      card.append(el("label", { class: "bfield", title: field.description },
        el("span", {}, field.name), input,
        el("pre", { class: "error", id: `backend-${index}-error-${field.name}` })));
    }
    card.append(el("pre", { class: "error", id: `backend-${index}-error-_` }));
    box.append(card);
  });
}

function inlineConditioningInput(backend, index) {
  const spec = (backend.conditioning || [])[0] || null;
  const select = el("select", { id: `backend-${index}-conditioning` },
    el("option", { value: "" }, "none (or conditioning_data)"),
    state.schema.detectors.map((d) => el("option", { value: d.name }, d.name)));
  const params = el("input", { id: `backend-${index}-conditioning-params`, placeholder: "params (JSON)", spellcheck: "false" });
  select.value = spec ? spec.type : "";
  params.value = spec && spec.params && Object.keys(spec.params).length ? JSON.stringify(spec.params) : "";
  const update = () => {
    state.backendsDirty = true;
    if (!select.value) { delete backend.conditioning; return; }
    let parsed = {};
    try { parsed = params.value.trim() ? JSON.parse(params.value) : {}; } catch (e) { parsed = params.value; }
    backend.conditioning = [{ type: select.value, params: parsed }];
  };
  select.addEventListener("change", update);
  params.addEventListener("input", update);
  return el("span", { class: "pair" }, select, params);
}

async function loadBackends() {
  const path = dataloaderPath();
  try {
    const data = await api("GET", "/api/dataloader" + q({ path }));
    state.backends = data.backends;
  } catch (error) {
    state.backends = [];
    if (error.status !== 404) $("#backends-errors").textContent = error.message;
  }
  state.backendsDirty = false;
  renderBackends();
}

function showBackendProblems(problems) {
  for (const node of $$("#backends pre.error")) node.textContent = "";
  $("#backends-errors").textContent = problems ? (problems.general || []).join("\n") : "";
  if (!problems) return;
  for (const [index, keys] of Object.entries(problems.backends || {})) {
    for (const [key, lines] of Object.entries(keys)) {
      const node = $(`#backend-${index}-error-${key}`) || $(`#backend-${index}-error-_`);
      if (node) node.textContent += lines.join("\n");
    }
  }
  for (const [key, lines] of Object.entries(problems.fields || {})) $("#backends-errors").textContent += lines.join("\n");
}

async function saveBackends() {
  if (!state.backendsDirty) return true;
  const path = dataloaderPath();
  try {
    await api("PUT", "/api/dataloader", { path, backends: state.backends });
    state.backendsDirty = false;
    showBackendProblems(null);
    const field = $("#field-data_backend_config");
    if (!field.value.trim()) { field.value = "multidatabackend.json"; state.touched.add("data_backend_config"); }
    notice(`saved ${path}`);
    return true;
  } catch (error) {
    showTab("Data");
    if (error.data && error.data.problems) showBackendProblems(error.data.problems);
    notice(`dataloader not saved: ${error.message.split("\n")[0]}`, true);
    return false;
  }
}

// --- preview: targets and plan ---------------------------------------------------------------

let targetsRequest = 0;
const scheduleTargets = debounce(refreshTargets, 300);

async function refreshTargets() {
  const ticket = ++targetsRequest;
  $("#targets-status").textContent = "resolving on the model...";
  $("#targets-errors").textContent = "";
  const side = $("#targets-side").value || null;
  try {
    const data = await api("POST", "/api/targets", { path: state.configPath, values: formValues(), side });
    if (ticket !== targetsRequest) return;
    const summary = $("#targets-summary");
    summary.textContent = "";
    for (const line of data.summary) summary.append(el("li", {}, line));
    const body = $("#targets-list");
    body.textContent = "";
    for (const m of data.modules) {
      body.append(el("tr", {}, el("td", { class: "module" }, m.name), el("td", {}, m.layer_type),
        el("td", {}, m.shape.join("x")), el("td", {}, el("code", {}, m.pattern))));
    }
    for (const [name, why] of Object.entries(data.skipped)) {
      body.append(el("tr", { class: "skipped" }, el("td", { class: "module" }, name),
        el("td", { colspan: 3 }, "left out: " + why)));
    }
    $("#targets-status").textContent = `${data.modules.length} modules, ${data.report.side} side`;
    $("#targets-table").dataset.slider = String(data.report.slider);
  } catch (error) {
    if (ticket !== targetsRequest) return;
    $("#targets-status").textContent = "";
    $("#targets-list").textContent = "";
    $("#targets-summary").textContent = "";
    $("#targets-errors").textContent = error.message;
    if (error.data && error.data.problems) showProblems(error.data.problems);
  }
}

async function runPlan() {
  showPreview("plan");
  $("#plan-errors").textContent = "";
  $("#plan-status").textContent = "planning...";
  if (!(await saveBackends())) { $("#plan-status").textContent = ""; return; }
  const count = parseInt($("#plan-count").value, 10) || 9;
  try {
    const data = await api("POST", "/api/plan", { path: state.configPath, values: formValues(), count });
    const body = $("#plan-list");
    body.textContent = "";
    data.lines.forEach((line, i) => {
      const thumbs = el("td", { class: "thumbs" });
      for (const pair of data.pairs[i]) {
        const name = (pair.image || pair.conditioning || "").split("/").pop();
        thumbs.append(el("span", { class: "pairing" },
          pair.image ? el("img", { src: "/api/thumb" + q({ path: pair.image, size: 64 }), alt: pair.image, title: pair.image }) : null,
          pair.conditioning ? el("img", { src: "/api/thumb" + q({ path: pair.conditioning, size: 64 }), alt: pair.conditioning, title: pair.conditioning }) : null,
          el("span", { class: "fname" }, name)));
      }
      const [cls] = signOf({ slider_strength: line.slider_strength });
      body.append(el("tr", {}, el("td", {}, String(line.step)),
        el("td", { class: "sign " + cls }, line.sign), el("td", {}, line.backend),
        el("td", {}, String(line.slider_strength)), thumbs));
    });
    $("#plan-status").textContent = data.summary;
  } catch (error) {
    $("#plan-list").textContent = "";
    $("#plan-status").textContent = "";
    $("#plan-errors").textContent = error.message;
    if (error.data && error.data.problems) showBackendProblems(error.data.problems);
  }
}

function showPreview(name) {
  for (const which of ["targets", "plan"]) {
    $("#preview-" + which).classList.toggle("hidden", which !== name);
    $("#preview-tab-" + which).classList.toggle("active", which === name);
  }
}

// --- the run -------------------------------------------------------------------------------

async function startJob(resume) {
  if (!resume && !(await saveConfig())) return;
  try {
    const snap = await api("POST", "/api/job/start", { path: state.configPath, resume });
    state.records = [];
    showJob(snap);
    follow();
  } catch (error) {
    notice(error.message.split("\n")[0], true);
    if (error.data && error.data.problems) showProblems(error.data.problems);
  }
}

async function stopJob() {
  try { showJob(await api("POST", "/api/job/stop")); } catch (error) { notice(error.message, true); }
}

function follow() {
  if (state.events) state.events.close();
  state.records = [];
  const source = new EventSource("/api/job/events");
  state.events = source;
  source.onmessage = (event) => showJob(JSON.parse(event.data));
  source.addEventListener("end", () => { source.close(); state.events = null; refreshOutputs(); });
}

function fmtTime(seconds) {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) return "-";
  const s = Math.round(seconds);
  return s >= 3600 ? `${Math.floor(s / 3600)}h${String(Math.floor(s / 60) % 60).padStart(2, "0")}m`
    : s >= 60 ? `${Math.floor(s / 60)}m${String(s % 60).padStart(2, "0")}s` : `${s}s`;
}

function showJob(snap) {
  if (state.job && snap.id !== state.job.id) state.records = [];
  state.job = snap;
  state.records.push(...(snap.records || []));
  const running = snap.state === "running" || snap.state === "stopping";
  $("#job-state").textContent = snap.state;
  $("#job-state").className = "badge " + snap.state;
  $("#job-message").textContent = snap.message || "";
  $("#job-start").disabled = running;
  $("#job-stop").disabled = !running;
  $("#job-resume").disabled = running || !(snap.checkpoints && snap.checkpoints.length);
  $("#job-step").textContent = snap.id ? `${snap.step} / ${snap.max_steps ?? "?"}` : "-";
  $("#job-loss").textContent = snap.loss === null || snap.loss === undefined ? "-" : Number(snap.loss).toFixed(4);
  $("#job-sign").textContent = snap.sign ?? "-";
  $("#job-backend").textContent = snap.backend ?? "-";
  $("#job-rate").textContent = snap.it_s ? snap.it_s.toFixed(2) : "-";
  $("#job-eta").textContent = fmtTime(snap.eta_s);
  const bar = $("#job-progress");
  bar.max = snap.max_steps || 1;
  bar.value = Math.min(snap.step || 0, bar.max);
  $("#job-log").textContent = (snap.log_tail || []).join("\n");
  $("#job-log").classList.toggle("failed", snap.state === "failed");
  drawCurve();
  if (snap.output_dir && Date.now() - state.lastOutputs > 2500) refreshOutputs(snap.output_dir);
}

function drawCurve() {
  const svg = $("#loss-curve");
  svg.textContent = "";
  const records = state.records.filter((r) => typeof r.loss === "number" && isFinite(r.loss));
  if (records.length < 1) return;
  const steps = records.map((r) => r.step);
  const losses = records.map((r) => r.loss);
  const x0 = Math.min(...steps), x1 = Math.max(...steps, x0 + 1);
  const y1 = Math.max(...losses, 1e-9);
  const x = (s) => 4 + (392 * (s - x0)) / (x1 - x0);
  const y = (v) => 116 - (108 * v) / y1;
  for (const [sign, cls] of [["+", "plus"], ["-", "minus"], ["0", "zero"]]) {
    const points = records.filter((r) => r.sign === sign).map((r) => `${x(r.step).toFixed(1)},${y(r.loss).toFixed(1)}`);
    if (points.length) svg.append(el("polyline", { points: points.join(" "), class: "curve " + cls }));
  }
  $("#loss-scale").textContent = `steps ${x0}-${x1}, loss 0-${y1.toPrecision(3)}`;
}

// --- outputs ---------------------------------------------------------------------------------

async function refreshOutputs(outputDir) {
  state.lastOutputs = Date.now();
  const path = outputDir || (state.job && state.job.output_dir) ||
    fromConfig($("#field-output_dir").value.trim() || "output");
  let data;
  try { data = await api("GET", "/api/outputs" + q({ path })); } catch (error) { return; }
  $("#outputs-dir").textContent = data.output_dir;
  $("#outputs").dataset.dir = data.output_dir;
  const box = $("#outputs-validation");
  box.textContent = "";
  for (const group of data.validation) {
    const images = group.images.map((image) => el("figure", { class: image.sweep ? "sweep" : "single" },
      el("a", { href: "/api/file" + q({ path: image.path }), target: "_blank" },
        el("img", { src: "/api/file" + q({ path: image.path, v: image.mtime }), alt: image.name })),
      el("figcaption", {}, image.name)));
    box.append(el("div", { class: "validation" }, el("h3", {}, group.name), el("div", { class: "images" }, images)));
  }
  const table = $("#outputs-files");
  const body = $("tbody", table);
  body.textContent = "";
  for (const f of data.files) {
    const name = f.folder ? el("span", {}, f.name + "/") : el("a", { href: "/api/file" + q({ path: f.path }) }, f.name);
    body.append(el("tr", {}, el("td", {}, name), el("td", {}, f.what),
      el("td", {}, el("code", {}, f.diffusers)), el("td", {}, f.comfyui)));
  }
  table.classList.toggle("hidden", !data.files.length);
}

async function exportSlider(format) {
  const adapter = $("#outputs").dataset.dir;
  const strength = Number($("#export-strength").value || 1);
  $("#export-result").textContent = `exporting ${format}...`;
  try {
    const result = await api("POST", "/api/export", { adapter, format, strength });
    $("#export-result").textContent = result.ok ? `written: ${result.path || result.stdout.trim()}`
      : `export failed (exit ${result.exit_code}):\n${result.stderr}`;
    refreshOutputs(adapter);
  } catch (error) { $("#export-result").textContent = error.message; }
}

// --- tools: preprocess and upload ---------------------------------------------------------------

async function runPreprocess() {
  const out = $("#tools-result");
  let params = {};
  try { params = $("#pre-params").value.trim() ? JSON.parse($("#pre-params").value) : {}; } catch (e) {
    out.textContent = "params must be a JSON object"; return;
  }
  const resolution = parseInt($("#pre-resolution").value, 10) || null;
  out.textContent = "preprocessing...";
  try {
    const result = await api("POST", "/api/preprocess", { detector: $("#pre-detector").value,
      input: $("#pre-input").value.trim(), output: $("#pre-output").value.trim(), resolution, params });
    out.textContent = (result.ok ? "" : `failed (exit ${result.exit_code})\n`) + result.stdout + result.stderr;
    refreshFolders();
  } catch (error) { out.textContent = error.message; }
}

async function runUpload() {
  const folder = $("#upload-folder").value.trim().replace(/\/+$/, "");
  const files = Array.from($("#upload-files").files);
  const out = $("#tools-result");
  out.textContent = "";
  for (const file of files) {
    const path = folder ? `${folder}/${file.name}` : file.name;
    try {
      const response = await fetch("/api/upload" + q({ path }), { method: "PUT", body: file, headers: { "X-Slider-CN": "1" } });
      const data = await response.json();
      out.textContent += response.ok ? `uploaded ${data.path} (${data.size} bytes)\n` : `${file.name}: ${data.detail}\n`;
    } catch (error) { out.textContent += `${file.name}: ${error.message}\n`; }
  }
  refreshFolders();
}

async function refreshFolders() {
  const data = await api("GET", "/api/folders");
  const list = $("#folder-list");
  list.textContent = "";
  const base = dirname(dataloaderPath());
  for (const folder of data.folders) {
    const rel = base && folder.startsWith(base + "/") ? folder.slice(base.length + 1) : folder;
    list.append(el("option", { value: rel }));
  }
}

async function refreshJsonFiles() {
  const data = await api("GET", "/api/files" + q({ path: "" }));
  const list = $("#json-files");
  list.textContent = "";
  for (const entry of data.entries) if (entry.kind === "file" && entry.name.endsWith(".json")) list.append(el("option", { value: entry.path }));
}

// --- start ---------------------------------------------------------------------------------------

async function main() {
  if (location.search.includes("token=")) history.replaceState(null, "", location.pathname);
  const [info, schema] = await Promise.all([api("GET", "/api/info"), api("GET", "/api/schema")]);
  state.schema = schema;
  $("#workspace").textContent = "workspace: " + info.workspace;
  $("#config-path").value = info.default_config;
  renderForm();
  const detector = $("#pre-detector");
  for (const d of schema.detectors) detector.append(el("option", { value: d.name, title: d.summary }, d.name));
  $("#config-load").addEventListener("click", loadConfig);
  $("#config-save").addEventListener("click", saveConfig);
  $("#config-drop-unknown").addEventListener("click", dropUnknownKeys);
  $("#targets-refresh").addEventListener("click", refreshTargets);
  $("#targets-side").addEventListener("change", refreshTargets);
  $("#plan-run").addEventListener("click", runPlan);
  $("#preview-tab-targets").addEventListener("click", () => showPreview("targets"));
  $("#preview-tab-plan").addEventListener("click", () => showPreview("plan"));
  $("#job-start").addEventListener("click", () => startJob(false));
  $("#job-resume").addEventListener("click", () => startJob(true));
  $("#job-stop").addEventListener("click", stopJob);
  for (const button of $$("button.export")) button.addEventListener("click", () => exportSlider(button.dataset.format));
  $("#pre-run").addEventListener("click", runPreprocess);
  $("#upload-run").addEventListener("click", runUpload);
  await loadConfig();
  refreshFolders();
  refreshJsonFiles();
  const snap = await api("GET", "/api/job");
  showJob(snap);
  if (snap.state === "running" || snap.state === "stopping") follow();
  document.body.dataset.ready = "true";
}

main().catch((error) => notice(`the page could not start: ${error.message}`, true));
