/* Rex-Omni playground: sends an image to POST /v1/detect/stream and draws every detection the
 * moment its event arrives. Plain JavaScript, no dependencies, nothing loaded from elsewhere.
 *
 * For automated checks the page keeps its state on `window.playground`: `drawn` (what the last
 * drawing put on the canvas: {type, label, score, ...}), `detections`, `result`, `events`, and
 * `extraOptions` (merged into the request's options; not part of the form). */
"use strict";

(() => {
  // COCO's person skeleton, by the keypoint names the server uses.
  const PERSON_SKELETON = [
    ["left ankle", "left knee"], ["left knee", "left hip"],
    ["right ankle", "right knee"], ["right knee", "right hip"],
    ["left hip", "right hip"],
    ["left shoulder", "left hip"], ["right shoulder", "right hip"],
    ["left shoulder", "right shoulder"],
    ["left shoulder", "left elbow"], ["left elbow", "left wrist"],
    ["right shoulder", "right elbow"], ["right elbow", "right wrist"],
    ["left eye", "right eye"], ["nose", "left eye"], ["nose", "right eye"],
    ["left eye", "left ear"], ["right eye", "right ear"],
    ["left ear", "left shoulder"], ["right ear", "right shoulder"],
  ];
  // AP-10K's animal skeleton.
  const ANIMAL_SKELETON = [
    ["left eye", "right eye"], ["left eye", "nose"], ["right eye", "nose"],
    ["nose", "neck"], ["neck", "root of tail"],
    ["neck", "left shoulder"], ["left shoulder", "left elbow"], ["left elbow", "left front paw"],
    ["neck", "right shoulder"], ["right shoulder", "right elbow"], ["right elbow", "right front paw"],
    ["root of tail", "left hip"], ["left hip", "left knee"], ["left knee", "left back paw"],
    ["root of tail", "right hip"], ["right hip", "right knee"], ["right knee", "right back paw"],
  ];
  const ANIMAL_ONLY = ["neck", "root of tail", "left front paw", "right front paw", "left back paw", "right back paw"];

  // Formats the server decodes; anything else the browser can show is sent re-encoded as PNG.
  const SERVER_IMAGE_TYPES = new Set(["image/jpeg", "image/png", "image/webp", "image/bmp", "image/gif", "image/tiff"]);
  // Used when GET /v1/tasks cannot be read.
  const FALLBACK_TASKS = [
    "detection", "pointing", "visual_prompting", "keypoint", "ocr_box", "ocr_polygon", "gui_grounding", "gui_pointing",
  ].map((name) => ({
    name,
    description: "",
    requires_categories: name !== "visual_prompting",
    requires_visual_prompt: name === "visual_prompting",
    requires_keypoint_type: name === "keypoint",
    tileable: !["visual_prompting", "gui_grounding", "gui_pointing"].includes(name),
  }));
  const PLACEHOLDERS = {
    detection: "person, car", pointing: "cup", keypoint: "person", ocr_box: "word", ocr_polygon: "text line",
    gui_grounding: "the search button", gui_pointing: "the close icon",
  };
  const KEY_STORAGE = "rexomni.playground.apiKey";
  const IMAGE_SENTINEL = "\u0000image\u0000";

  const $ = (id) => document.getElementById(id);
  const el = {};

  const playground = {
    drawn: [],
    detections: [],
    result: null,
    events: [],
    extraOptions: {},
    running: false,
    runs: 0, // requests sent so far
    tasks: {},
    image: null,
    imageUri: null,
    imageName: "image.png",
    promptBoxes: [],
    scale: 1,
    /** Image pixels -> canvas (backing store) pixels. */
    toCanvas(x, y) {
      const k = this.scale * pixelRatio();
      return [x * k, y * k];
    },
    colourOf: (label) => colourOf(label),
  };
  window.playground = playground;

  let colours = new Map();
  let dragging = null;
  let controller = null;

  function pixelRatio() {
    return window.devicePixelRatio || 1;
  }

  function colourOf(label, alpha = 1) {
    if (!colours.has(label)) colours.set(label, colours.size);
    const hue = (colours.get(label) * 137.508 + 20) % 360; // golden angle: neighbours differ
    return `hsla(${hue.toFixed(1)}, 85%, 45%, ${alpha})`;
  }

  // ---- status and errors ------------------------------------------------------------------
  function setStatus(text) {
    el.status.textContent = text;
    el.status.className = text;
  }

  function showError(message) {
    el.error.textContent = message;
    el.error.hidden = false;
  }

  function clearError() {
    el.error.textContent = "";
    el.error.hidden = true;
  }

  function describeError(status, error) {
    const code = error && error.code ? error.code : "error";
    const message = error && error.message ? error.message : "";
    let text = `${status ? `${status} ` : ""}${code}: ${message}`;
    if (status === 401) text += "\nEnter an API key below the options.";
    return text;
  }

  async function httpError(response) {
    const text = await response.text();
    try {
      const body = JSON.parse(text);
      if (body && body.error) return describeError(response.status, body.error);
    } catch (_) {
      /* not JSON: shown as it is */
    }
    return `${response.status} ${response.statusText}${text ? `: ${text.slice(0, 500)}` : ""}`;
  }

  // ---- tasks ------------------------------------------------------------------------------
  async function loadTasks() {
    let tasks = FALLBACK_TASKS;
    try {
      const response = await fetch("v1/tasks", { cache: "no-store" });
      if (!response.ok) throw new Error(await httpError(response));
      tasks = (await response.json()).tasks;
    } catch (err) {
      showError(`Could not read the tasks (GET /v1/tasks): ${err.message}`);
    }
    el.task.replaceChildren();
    for (const task of tasks) {
      playground.tasks[task.name] = task;
      const option = document.createElement("option");
      option.value = task.name;
      option.textContent = task.name;
      el.task.append(option);
    }
    taskChanged();
  }

  function currentTask() {
    return playground.tasks[el.task.value] || FALLBACK_TASKS[0];
  }

  function prompting() {
    return Boolean(currentTask().requires_visual_prompt);
  }

  function taskChanged() {
    const task = currentTask();
    el.taskDescription.textContent = task.description || "";
    el.categoriesField.hidden = !task.requires_categories;
    el.keypointField.hidden = !task.requires_keypoint_type;
    el.promptField.hidden = !task.requires_visual_prompt;
    el.tilingField.hidden = task.tileable === false;
    el.stage.classList.toggle("prompting", prompting());
    el.categories.placeholder = PLACEHOLDERS[task.name] || "";
    redraw();
    updateCurl();
  }

  // ---- the image --------------------------------------------------------------------------
  function loadFile(file) {
    if (!file) return;
    if (file.type && !file.type.startsWith("image/")) {
      showError(`${file.name || "That file"} is not an image (${file.type}).`);
      return;
    }
    const reader = new FileReader();
    reader.onload = () => useImage(reader.result, file.name || "image.png", file.type);
    reader.onerror = () => showError(`Could not read ${file.name || "the file"}.`);
    reader.readAsDataURL(file);
  }

  function useImage(uri, name, type) {
    const img = new Image();
    img.onload = () => {
      if (!img.naturalWidth || !img.naturalHeight) {
        showError("That image has no size the browser can draw.");
        return;
      }
      let sent = uri;
      if (!SERVER_IMAGE_TYPES.has(type)) {
        const copy = document.createElement("canvas");
        copy.width = img.naturalWidth;
        copy.height = img.naturalHeight;
        copy.getContext("2d").drawImage(img, 0, 0);
        sent = copy.toDataURL("image/png");
        name = `${name.replace(/\.[^.]*$/, "") || "image"}.png`;
      }
      if (controller) controller.abort(); // its detections belong to the previous image
      clearError();
      playground.image = img;
      playground.imageUri = sent;
      playground.imageName = name;
      playground.promptBoxes = [];
      renderPromptBoxes();
      clearResults();
      el.imageInfo.textContent = `${name}: ${img.naturalWidth} × ${img.naturalHeight} px`;
      el.dropHint.hidden = true;
      fit();
      redraw();
      updateCurl();
    };
    img.onerror = () => showError(`The browser cannot display ${name} (${type || "unknown type"}).`);
    img.src = uri;
  }

  /** Sizes the canvas to show the whole image in the stage (at most 4x enlarged). */
  function fit() {
    const img = playground.image;
    const ratio = pixelRatio();
    const width = Math.max(200, el.stage.clientWidth - 4);
    const height = Math.max(240, Math.round(window.innerHeight * 0.7));
    if (!img) {
      playground.scale = 1;
      return;
    }
    const scale = Math.min(width / img.naturalWidth, height / img.naturalHeight, 4);
    playground.scale = scale;
    const cssWidth = Math.max(1, Math.round(img.naturalWidth * scale));
    const cssHeight = Math.max(1, Math.round(img.naturalHeight * scale));
    el.canvas.width = Math.round(cssWidth * ratio);
    el.canvas.height = Math.round(cssHeight * ratio);
    el.canvas.style.width = `${cssWidth}px`;
    el.canvas.style.height = `${cssHeight}px`;
  }

  // ---- drawing ----------------------------------------------------------------------------
  function visible(detection) {
    const threshold = Number(el.threshold.value);
    return detection.score === null || detection.score === undefined || detection.score >= threshold;
  }

  function redraw() {
    const ctx = el.canvas.getContext("2d");
    ctx.clearRect(0, 0, el.canvas.width, el.canvas.height);
    playground.drawn = [];
    if (!playground.image) return;
    ctx.drawImage(playground.image, 0, 0, el.canvas.width, el.canvas.height);
    if (prompting()) {
      playground.promptBoxes.forEach((box, i) => drawPromptBox(ctx, box, `#${i + 1}`));
      if (dragging) drawPromptBox(ctx, normalised(dragging), "");
    }
    playground.detections.forEach((detection, index) => {
      if (visible(detection)) drawDetection(ctx, detection, index);
    });
  }

  function drawPromptBox(ctx, box, tag) {
    const r = pixelRatio();
    const [x0, y0] = playground.toCanvas(box[0], box[1]);
    const [x1, y1] = playground.toCanvas(box[2], box[3]);
    ctx.save();
    ctx.lineWidth = 2 * r;
    ctx.strokeStyle = "rgba(0, 0, 0, 0.85)";
    ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
    ctx.setLineDash([6 * r, 4 * r]);
    ctx.strokeStyle = "#ffffff";
    ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
    ctx.restore();
    if (tag) drawTag(ctx, tag, x0, y0, "rgba(0, 0, 0, 0.8)");
  }

  function drawTag(ctx, text, x, y, background) {
    const r = pixelRatio();
    const size = 12 * r;
    ctx.save();
    ctx.font = `600 ${size}px system-ui, sans-serif`;
    const width = ctx.measureText(text).width + 8 * r;
    const height = size + 6 * r;
    const top = y - height >= 0 ? y - height : y; // above the shape when there is room
    const left = Math.min(Math.max(0, x), Math.max(0, el.canvas.width - width));
    ctx.fillStyle = background;
    ctx.fillRect(left, top, width, height);
    ctx.fillStyle = "#ffffff";
    ctx.textBaseline = "middle";
    ctx.fillText(text, left + 4 * r, top + height / 2);
    ctx.restore();
  }

  function tagText(detection) {
    const label = detection.label.length > 40 ? `${detection.label.slice(0, 39)}…` : detection.label;
    return typeof detection.score === "number" ? `${label} ${detection.score.toFixed(2)}` : label;
  }

  function skeletonFor(keypoints) {
    return ANIMAL_ONLY.some((name) => name in keypoints) ? ANIMAL_SKELETON : PERSON_SKELETON;
  }

  function drawDetection(ctx, detection, index) {
    const r = pixelRatio();
    const colour = colourOf(detection.label);
    const entry = { type: detection.type, label: detection.label, score: detection.score ?? null, index };
    ctx.save();
    ctx.lineWidth = 2.5 * r;
    ctx.strokeStyle = colour;
    ctx.fillStyle = colour;
    let tagAt = [0, 0];
    if (detection.type === "box" || detection.type === "keypoints") {
      const [x0, y0] = playground.toCanvas(detection.box[0], detection.box[1]);
      const [x1, y1] = playground.toCanvas(detection.box[2], detection.box[3]);
      if (detection.type === "keypoints") ctx.setLineDash([5 * r, 3 * r]);
      ctx.beginPath();
      ctx.rect(x0, y0, x1 - x0, y1 - y0);
      strokeWithHalo(ctx, colour, 2.5 * r);
      ctx.setLineDash([]);
      tagAt = [x0, y0];
    }
    if (detection.type === "point") {
      const [x, y] = playground.toCanvas(detection.point[0], detection.point[1]);
      dot(ctx, x, y, 6 * r, colour);
      tagAt = [x + 8 * r, y - 4 * r];
    } else if (detection.type === "polygon") {
      ctx.beginPath();
      detection.polygon.forEach(([px, py], i) => {
        const [x, y] = playground.toCanvas(px, py);
        if (i === 0) ctx.moveTo(x, y);
        else ctx.lineTo(x, y);
      });
      ctx.closePath();
      ctx.fillStyle = colourOf(detection.label, 0.22);
      ctx.fill();
      strokeWithHalo(ctx, colour, 2.5 * r);
      tagAt = playground.toCanvas(...topLeftVertex(detection.polygon));
      entry.vertices = detection.polygon.length;
    } else if (detection.type === "keypoints") {
      const points = {};
      for (const [name, point] of Object.entries(detection.keypoints)) {
        if (point) points[name] = playground.toCanvas(point[0], point[1]);
      }
      let edges = 0;
      ctx.beginPath();
      for (const [a, b] of skeletonFor(detection.keypoints)) {
        if (!points[a] || !points[b]) continue;
        ctx.moveTo(...points[a]);
        ctx.lineTo(...points[b]);
        edges += 1;
      }
      ctx.lineCap = "round";
      strokeWithHalo(ctx, colour, 2 * r);
      for (const [x, y] of Object.values(points)) dot(ctx, x, y, 3.5 * r, colour);
      entry.points = Object.keys(points).length;
      entry.edges = edges;
    }
    ctx.restore();
    drawTag(ctx, tagText(detection), tagAt[0], tagAt[1], colour);
    entry.at = performance.now();
    playground.drawn.push(entry);
  }

  /** Strokes the current path in the colour over a dark halo: visible on any image. */
  function strokeWithHalo(ctx, colour, width) {
    ctx.lineWidth = width + 2 * pixelRatio();
    ctx.strokeStyle = "rgba(0, 0, 0, 0.5)";
    ctx.stroke();
    ctx.lineWidth = width;
    ctx.strokeStyle = colour;
    ctx.stroke();
  }

  function dot(ctx, x, y, radius, colour) {
    ctx.beginPath();
    ctx.arc(x, y, radius, 0, 2 * Math.PI);
    ctx.fillStyle = colour;
    ctx.fill();
    ctx.lineWidth = Math.max(1, radius / 3);
    ctx.strokeStyle = "#ffffff";
    ctx.stroke();
  }

  function topLeftVertex(polygon) {
    return polygon.reduce((best, p) => (p[1] + p[0] < best[1] + best[0] ? p : best), polygon[0]);
  }

  // ---- the detections list ----------------------------------------------------------------
  const fmt = (v) => (Math.round(v * 10) / 10).toString();
  const fmtPoint = (p) => `[${fmt(p[0])}, ${fmt(p[1])}]`;

  function geometryText(detection) {
    switch (detection.type) {
      case "box":
        return `box [${detection.box.map(fmt).join(", ")}]`;
      case "point":
        return `point ${fmtPoint(detection.point)}`;
      case "polygon":
        return `polygon (${detection.polygon.length} points) [${detection.polygon.map(fmtPoint).join(", ")}]`;
      case "keypoints": {
        const entries = Object.entries(detection.keypoints);
        const shown = entries.filter(([, p]) => p);
        const hidden = entries.length - shown.length;
        const names = shown.map(([name, p]) => `${name} ${fmtPoint(p)}`).join(", ");
        return `box [${detection.box.map(fmt).join(", ")}]; ${shown.length} keypoints` +
          `${hidden ? ` (${hidden} hidden)` : ""}: ${names}`;
      }
      default:
        return JSON.stringify(detection);
    }
  }

  function listItem(detection, index) {
    const li = document.createElement("li");
    li.dataset.testid = "detection";
    li.dataset.index = String(index);
    li.dataset.label = detection.label;
    li.dataset.type = detection.type;
    if (typeof detection.score === "number") li.dataset.score = String(detection.score);
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = colourOf(detection.label);
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = detection.label;
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = typeof detection.score === "number" ? detection.score.toFixed(3) : "no score";
    const geometry = document.createElement("span");
    geometry.className = "geometry";
    geometry.textContent = geometryText(detection);
    li.append(swatch, label, score, geometry);
    li.hidden = !visible(detection);
    return li;
  }

  function refreshList() {
    el.detections.replaceChildren(...playground.detections.map(listItem));
    updateSummary();
  }

  function updateSummary() {
    const total = playground.detections.length;
    const hidden = playground.detections.filter((d) => !visible(d)).length;
    let text = `${total} detection${total === 1 ? "" : "s"}`;
    if (hidden) text += ` (${hidden} below the threshold)`;
    const result = playground.result;
    if (result) {
      text += ` · finish: ${result.finish_reason}`;
      if (result.truncated) text += " (truncated)";
      if (result.timings && typeof result.timings.total_ms === "number") {
        text += ` · ${Math.round(result.timings.total_ms)} ms`;
      }
    }
    el.summary.textContent = total || result ? text : "";
  }

  function clearResults() {
    colours = new Map();
    playground.detections = [];
    playground.result = null;
    playground.events = [];
    el.detections.replaceChildren();
    el.raw.textContent = "";
    updateSummary();
  }

  // ---- the request ------------------------------------------------------------------------
  function requestBody() {
    const task = currentTask();
    const body = { image: playground.imageUri, task: task.name };
    if (task.requires_categories) {
      body.categories = el.categories.value.split(",").map((c) => c.trim()).filter(Boolean);
    }
    if (task.requires_keypoint_type) body.keypoint_type = el.keypointType.value;
    if (task.requires_visual_prompt) {
      body.visual_prompt_boxes = playground.promptBoxes.map((box) => box.map((v) => Math.round(v * 10) / 10));
    }
    const options = {};
    const maxNewTokens = el.maxNewTokens.value.trim();
    if (maxNewTokens) options.max_new_tokens = Number(maxNewTokens);
    options.scores = el.scores.checked;
    if (el.tiling.checked && currentTask().tileable !== false) options.tiling = "auto";
    Object.assign(options, playground.extraOptions || {});
    body.options = options;
    return body;
  }

  function apiKey() {
    return el.apiKey.value.trim();
  }

  function shellQuote(text) {
    return /^[A-Za-z0-9._\/-]+$/.test(text) ? text : `'${text.replace(/'/g, "'\\''")}'`;
  }

  function curlCommand(body) {
    const url = new URL("v1/detect/stream", window.location.href).href;
    const file = playground.imageName;
    // In an unquoted here-document the shell expands $, ` and \: the JSON's own are escaped,
    // then the image is put in as the shell's base64 of the file.
    let json = JSON.stringify({ ...body, image: IMAGE_SENTINEL }).replace(/[\\$`]/g, (c) => `\\${c}`);
    const placeholder = `"image":${JSON.stringify(IMAGE_SENTINEL).replace(/[\\$`]/g, (c) => `\\${c}`)}`;
    json = json.replace(placeholder, `"image":"$(base64 -w0 ${shellQuote(file)})"`);
    const lines = [
      `# ${file}: the image, read and base64-encoded by the shell`,
      `curl -sN ${shellQuote(url)} \\`,
      "  -H 'content-type: application/json' \\",
    ];
    if (apiKey()) lines.push('  -H "Authorization: Bearer $REXOMNI_API_KEY" \\');
    lines.push("  -d @- <<JSON", json, "JSON");
    return lines.join("\n");
  }

  function updateCurl() {
    if (!el.curl) return;
    el.curl.textContent = playground.imageUri ? curlCommand(requestBody()) : "Pick an image to see the request.";
  }

  /** Reads a server-sent-event stream, calling onEvent(name, data) per event (comments skipped). */
  async function readEvents(body, onEvent) {
    const reader = body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let name = "";
    let data = [];
    const line = (text) => {
      if (text === "") {
        if (data.length) onEvent(name || "message", data.join("\n"));
        name = "";
        data = [];
        return;
      }
      if (text.startsWith(":")) return; // keep-alive comment
      const colon = text.indexOf(":");
      const field = colon < 0 ? text : text.slice(0, colon);
      let value = colon < 0 ? "" : text.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "event") name = value;
      else if (field === "data") data.push(value);
    };
    for (;;) {
      const { value, done } = await reader.read();
      buffer += done ? decoder.decode() : decoder.decode(value, { stream: true });
      const breaks = /\r\n|\r|\n/g;
      let start = 0;
      let match;
      while ((match = breaks.exec(buffer)) !== null) {
        // A lone "\r" at the end may be the first half of "\r\n": wait for the next chunk.
        if (!done && match[0] === "\r" && match.index === buffer.length - 1) break;
        line(buffer.slice(start, match.index));
        start = match.index + match[0].length;
      }
      buffer = buffer.slice(start);
      if (done) {
        if (buffer) line(buffer);
        line("");
        return;
      }
    }
  }

  function addDetection(detection) {
    const index = playground.detections.length;
    playground.detections.push(detection);
    if (visible(detection)) drawDetection(el.canvas.getContext("2d"), detection, index);
    el.detections.append(listItem(detection, index));
    updateSummary();
  }

  function finish(result) {
    playground.result = result;
    if (Array.isArray(result.detections) && result.detections.length !== playground.detections.length) {
      playground.detections = result.detections.slice(); // the final word, should the stream have differed
      redraw();
      refreshList();
    }
    el.raw.textContent = JSON.stringify(result, null, 2);
    updateSummary();
  }

  async function run(event) {
    event.preventDefault();
    if (playground.running) return;
    clearError();
    if (!playground.imageUri) {
      showError("Pick, drop or paste an image first.");
      setStatus("error");
      return;
    }
    const body = requestBody();
    updateCurl();
    clearResults();
    redraw();
    const headers = { "content-type": "application/json", accept: "text/event-stream" };
    if (apiKey()) headers.authorization = `Bearer ${apiKey()}`;
    controller = new AbortController();
    playground.running = true;
    playground.runs += 1;
    el.run.disabled = true;
    el.stop.disabled = false;
    setStatus("running");
    const started = performance.now();
    let ended = false;
    try {
      const response = await fetch("v1/detect/stream", {
        method: "POST", headers, body: JSON.stringify(body), signal: controller.signal, cache: "no-store",
      });
      if (!response.ok) {
        showError(await httpError(response));
        setStatus("error");
        return;
      }
      await readEvents(response.body, (name, data) => {
        playground.events.push({ event: name, at: performance.now() - started });
        if (name === "detection") {
          addDetection(JSON.parse(data).detection);
        } else if (name === "done") {
          ended = true;
          finish(JSON.parse(data));
          setStatus("done");
        } else if (name === "error") {
          ended = true;
          const error = JSON.parse(data).error || {};
          showError(describeError(error.status, error));
          setStatus("error");
        }
      });
      if (!ended) {
        showError("The stream ended before its result arrived.");
        setStatus("error");
      }
    } catch (err) {
      if (err.name === "AbortError") {
        setStatus("stopped");
      } else {
        showError(`The request failed: ${err.message}`);
        setStatus("error");
      }
    } finally {
      playground.running = false;
      controller = null;
      el.run.disabled = false;
      el.stop.disabled = true;
    }
  }

  // ---- visual prompts ---------------------------------------------------------------------
  function toImage(event) {
    const rect = el.canvas.getBoundingClientRect();
    const img = playground.image;
    const x = ((event.clientX - rect.left) / rect.width) * img.naturalWidth;
    const y = ((event.clientY - rect.top) / rect.height) * img.naturalHeight;
    return [Math.min(Math.max(0, x), img.naturalWidth), Math.min(Math.max(0, y), img.naturalHeight)];
  }

  function normalised(d) {
    return [Math.min(d.x0, d.x1), Math.min(d.y0, d.y1), Math.max(d.x0, d.x1), Math.max(d.y0, d.y1)];
  }

  function renderPromptBoxes() {
    el.promptBoxes.replaceChildren(
      ...playground.promptBoxes.map((box, i) => {
        const li = document.createElement("li");
        li.dataset.testid = "prompt-box";
        li.append(`[${box.map((v) => Math.round(v)).join(", ")}]`);
        const remove = document.createElement("button");
        remove.type = "button";
        remove.textContent = "×";
        remove.title = "Remove this box";
        remove.dataset.testid = "remove-prompt-box";
        remove.addEventListener("click", () => {
          playground.promptBoxes.splice(i, 1);
          renderPromptBoxes();
          redraw();
          updateCurl();
        });
        li.append(remove);
        return li;
      }),
    );
  }

  function pointerDown(event) {
    if (!prompting() || !playground.image || event.button !== 0) return;
    const [x, y] = toImage(event);
    dragging = { x0: x, y0: y, x1: x, y1: y };
    el.canvas.setPointerCapture(event.pointerId);
    event.preventDefault();
  }

  function pointerMove(event) {
    if (!dragging) return;
    [dragging.x1, dragging.y1] = toImage(event);
    redraw();
  }

  function pointerUp(event) {
    if (!dragging) return;
    [dragging.x1, dragging.y1] = toImage(event);
    const box = normalised(dragging);
    dragging = null;
    if (box[2] - box[0] >= 2 && box[3] - box[1] >= 2) playground.promptBoxes.push(box);
    renderPromptBoxes();
    redraw();
    updateCurl();
  }

  // ---- the API key ------------------------------------------------------------------------
  function storage() {
    try {
      return window.localStorage;
    } catch (_) {
      return null; // storage disabled: the key is kept for this page only
    }
  }

  function saveKey() {
    const store = storage();
    if (!store) return;
    if (el.rememberKey.checked && apiKey()) store.setItem(KEY_STORAGE, apiKey());
    else store.removeItem(KEY_STORAGE);
  }

  // ---- wiring -----------------------------------------------------------------------------
  function start() {
    for (const [key, id] of Object.entries({
      file: "file", imageInfo: "image-info", task: "task", taskDescription: "task-description",
      categoriesField: "categories-field", categories: "categories", keypointField: "keypoint-field",
      keypointType: "keypoint-type", promptField: "prompt-field", promptBoxes: "prompt-boxes",
      clearPrompts: "clear-prompts", maxNewTokens: "max-new-tokens", scores: "scores", tiling: "tiling",
      tilingField: "tiling-field", apiKey: "api-key",
      rememberKey: "remember-key", run: "run", stop: "stop", status: "status", error: "error",
      stage: "stage", canvas: "canvas", dropHint: "drop-hint", threshold: "threshold",
      thresholdValue: "threshold-value", summary: "summary", detections: "detections", curl: "curl",
      copyCurl: "copy-curl", raw: "raw", controls: "controls",
    })) {
      el[key] = $(id);
    }

    const store = storage();
    const saved = store ? store.getItem(KEY_STORAGE) : null;
    if (saved) {
      el.apiKey.value = saved;
      el.rememberKey.checked = true;
    }

    el.controls.addEventListener("submit", run);
    el.stop.addEventListener("click", () => controller && controller.abort());
    el.file.addEventListener("change", () => loadFile(el.file.files[0]));
    el.task.addEventListener("change", taskChanged);
    for (const input of [el.categories, el.keypointType, el.maxNewTokens, el.scores, el.tiling]) {
      input.addEventListener("input", updateCurl);
      input.addEventListener("change", updateCurl);
    }
    el.apiKey.addEventListener("input", () => {
      saveKey();
      updateCurl();
    });
    el.rememberKey.addEventListener("change", saveKey);
    el.clearPrompts.addEventListener("click", () => {
      playground.promptBoxes = [];
      renderPromptBoxes();
      redraw();
      updateCurl();
    });
    el.threshold.addEventListener("input", () => {
      el.thresholdValue.textContent = Number(el.threshold.value).toFixed(2);
      redraw();
      el.detections.querySelectorAll("li").forEach((li) => {
        li.hidden = !visible(playground.detections[Number(li.dataset.index)]);
      });
      updateSummary();
    });
    el.copyCurl.addEventListener("click", async () => {
      const text = el.curl.textContent;
      try {
        await navigator.clipboard.writeText(text);
      } catch (_) {
        const range = document.createRange(); // no clipboard API here (e.g. plain http): select it
        range.selectNodeContents(el.curl);
        const selection = window.getSelection();
        selection.removeAllRanges();
        selection.addRange(range);
        document.execCommand("copy");
      }
      el.copyCurl.textContent = "Copied";
      setTimeout(() => (el.copyCurl.textContent = "Copy"), 1500);
    });

    el.canvas.addEventListener("pointerdown", pointerDown);
    el.canvas.addEventListener("pointermove", pointerMove);
    el.canvas.addEventListener("pointerup", pointerUp);
    el.canvas.addEventListener("pointercancel", () => {
      dragging = null;
      redraw();
    });

    el.stage.addEventListener("dragover", (event) => {
      event.preventDefault();
      el.stage.classList.add("dragover");
    });
    el.stage.addEventListener("dragleave", () => el.stage.classList.remove("dragover"));
    el.stage.addEventListener("drop", (event) => {
      event.preventDefault();
      el.stage.classList.remove("dragover");
      loadFile(event.dataTransfer.files[0]);
    });
    document.addEventListener("paste", (event) => {
      const items = event.clipboardData ? Array.from(event.clipboardData.items) : [];
      const item = items.find((i) => i.kind === "file" && i.type.startsWith("image/"));
      if (item) {
        event.preventDefault();
        loadFile(item.getAsFile());
      }
    });
    window.addEventListener("resize", () => {
      fit();
      redraw();
    });

    updateCurl();
    setStatus("idle");
    loadTasks();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
