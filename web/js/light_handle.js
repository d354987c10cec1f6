// The Relight node's light handle: a lit sphere to drag the light on, and the face shaded by that light.
//
// Dragging on the sphere sets the node's azimuth and elevation widgets (the point under the pointer is where the
// light comes from: drag towards image right = light from image right; the ring around the sphere reaches behind
// it); the wheel changes intensity, shift+wheel ambient. Only the node's own widgets are written, so prompts,
// saved workflows and the CLI see nothing new, and a workflow saved here loads where this file is missing. Once
// the graph has run, the nearest Render Buffers node downstream has sent the first face's normal and albedo maps
// (nodes/face_nodes.py `_shading_preview`), and the face is shaded here, in the browser, as the renderer does
// (sh_shading.js), on every move. Releasing the handle is a change like any widget edit, so the queue's
// auto-queue "on change" mode runs the graph then. Every frontend hook is optional: where one is missing the
// node keeps its plain widgets and nothing errors.

import {
  anglesToDrag, dragToAngles, lightFromSliders, parseColor, parseNpy, shadeMaps, sphereMaps,
} from "./sh_shading.js";

const RELIGHT = "DiffusionRigRelight";
const RENDER_BUFFERS = "DiffusionRigRenderBuffers";
const UI_KEY = "diffusionrig_shading"; // Render Buffers' {"ui": {...}} entry
const SPHERE_PX = 192; // the handle canvas; the sphere's radius is RADIUS_PX, the ring reaches the canvas edge
const RADIUS_PX = 0.3 * SPHERE_PX;
const OUTER = SPHERE_PX / 2 / RADIUS_PX; // the canvas edge's radius in sphere radii: straight behind
const MIN_WIDTH = 420;
const COMMIT_AFTER_WHEEL_MS = 400;

async function frontend(path) {
  try {
    return await import(path);
  } catch (err) {
    console.warn(`comfy-diffusionrig light handle: ${path} is not available (${err}); Relight keeps its sliders`);
    return {};
  }
}

const { app } = await frontend("../../../scripts/app.js");
const { api } = await frontend("../../../scripts/api.js");

const mapsOf = new WeakMap(); // Render Buffers node -> {width, height, data, light}
const handles = new Set();
let mapsVersion = 0; // counts the maps received, so that a handle redraws when new ones arrive
let inputSpecs = {}; // Relight's required inputs from the server: min, max, step of the sliders

function classOf(node) {
  return node?.comfyClass ?? node?.type;
}

async function loadMaps(node, entry) {
  const query = new URLSearchParams({ filename: entry.filename, subfolder: entry.subfolder ?? "", type: entry.type ?? "temp" });
  const response = typeof api?.fetchApi === "function" ? await api.fetchApi(`/view?${query}`) : await fetch(`/view?${query}`);
  if (!response.ok) throw new Error(`GET /view ${entry.filename}: ${response.status}`);
  const { shape, data } = parseNpy(await response.arrayBuffer());
  if (shape.length !== 3 || shape[0] !== 6) throw new Error(`shading maps of shape [${shape}], expected [6, H, W]`);
  mapsOf.set(node, { height: shape[1], width: shape[2], data, light: (entry.light ?? []).flat() });
  mapsVersion += 1;
  for (const handle of handles) handle.refresh();
}

function graphLink(graph, id) {
  return graph?.links?.get?.(id) ?? graph?.links?.[id] ?? graph?.getLink?.(id);
}

// The nearest Render Buffers node downstream of `node` that has sent its maps (through Edit Expression & Pose,
// reroutes, ...), or null.
function downstreamMaps(node) {
  const graph = node.graph ?? app?.graph;
  const seen = new Set([node]);
  let frontier = [node];
  for (let depth = 0; depth < 12 && frontier.length; depth++) {
    const next = [];
    for (const current of frontier) {
      for (const output of current.outputs ?? []) {
        for (const id of output?.links ?? []) {
          const link = graphLink(graph, id);
          const target = link == null ? null : graph?.getNodeById?.(link.target_id);
          if (!target || seen.has(target)) continue;
          seen.add(target);
          if (classOf(target) === RENDER_BUFFERS && mapsOf.has(target)) return mapsOf.get(target);
          next.push(target);
        }
      }
    }
    frontier = next;
  }
  return null;
}

function widgetOf(node, name) {
  return node.widgets?.find((w) => w?.name === name);
}

function snapped(name, value) {
  const spec = inputSpecs[name]?.[1] ?? {};
  const step = Number(spec.step) > 0 ? Number(spec.step) : 0.01;
  const lo = Number.isFinite(spec.min) ? spec.min : -Infinity;
  const hi = Number.isFinite(spec.max) ? spec.max : Infinity;
  const decimals = Math.max(0, Math.ceil(-Math.log10(step)) + 1);
  return Number(Math.min(hi, Math.max(lo, Math.round(value / step) * step)).toFixed(decimals));
}

function setWidget(node, name, value) {
  const widget = widgetOf(node, name);
  if (!widget || typeof widget.value !== "number") return;
  const next = snapped(name, value);
  if (widget.value === next) return;
  widget.value = next;
  try {
    widget.callback?.call(widget, next, app?.canvas, node);
  } catch (err) {
    console.warn(`comfy-diffusionrig light handle: the ${name} widget's callback failed: ${err}`);
  }
  node.setDirtyCanvas?.(true, false); // the nodes, not the background: this runs on every pointer move
}

// A light edit is done: let the frontend record it (undo, the workflow's modified flag, auto-queue "on change").
// Releasing the pointer also sends the mouseup the frontend listens for; this covers the wheel.
function commitChange() {
  const tracker = app?.extensionManager?.workflow?.activeWorkflow?.changeTracker;
  try {
    (tracker?.captureCanvasState ?? tracker?.checkState)?.call(tracker);
  } catch (err) {
    console.warn(`comfy-diffusionrig light handle: could not record the change: ${err}`);
  }
}

function canvas(size, cursor) {
  const element = document.createElement("canvas");
  element.width = element.height = size;
  Object.assign(element.style, {
    flex: "1 1 0", minWidth: "0", maxHeight: "100%", aspectRatio: "1", objectFit: "contain",
    touchAction: "none", cursor, background: "#000", borderRadius: "4px",
  });
  return element;
}

function addHandle(node) {
  if (typeof node.addDOMWidget !== "function") return; // an older frontend: the sliders work as ever
  const root = document.createElement("div");
  root.className = "diffusionrig-light-handle";
  Object.assign(root.style, {
    display: "flex", flexDirection: "column", gap: "4px", width: "100%", height: "100%",
    boxSizing: "border-box", userSelect: "none",
  });
  const row = document.createElement("div");
  Object.assign(row.style, { display: "flex", gap: "6px", flex: "1 1 auto", minHeight: "0" });
  const sphere = canvas(SPHERE_PX, "crosshair");
  sphere.title = "Drag: where the light comes from (the ring: behind the face). Wheel: intensity; shift+wheel: ambient.";
  const face = canvas(256, "default");
  face.title = "The first face shaded by this light (Render Buffers' shaded buffer), after the graph has run once.";
  const caption = document.createElement("div");
  Object.assign(caption.style, { font: "11px sans-serif", color: "var(--input-text, #ccc)", whiteSpace: "nowrap",
    overflow: "hidden", textOverflow: "ellipsis" });
  row.append(sphere, face);
  root.append(row, caption);
  root.dataset.previewUpdates = "0";

  const sphereNormals = sphereMaps(Math.round(2 * RADIUS_PX));
  const sphereContext = sphere.getContext("2d");
  const faceContext = face.getContext("2d");
  let pending = false;
  let dragging = false;
  let wheelTimer = null;

  const value = (name, fallback) => {
    const v = widgetOf(node, name)?.value;
    return typeof v === "number" ? v : fallback;
  };

  function currentLight(maps) {
    if (widgetOf(node, "mode")?.value !== "sliders" && maps?.light?.length === 27) return { light: maps.light, live: false };
    const color = parseColor(widgetOf(node, "color")?.value ?? "#FFFFFF") ?? [1, 1, 1];
    return {
      light: lightFromSliders(value("azimuth", 0), value("elevation", 0), value("intensity", 1), value("ambient", 0), color),
      live: true,
    };
  }

  let drawn = "";
  const signature = () => JSON.stringify(["mode", "azimuth", "elevation", "intensity", "ambient", "color"]
    .map((name) => widgetOf(node, name)?.value)) + mapsVersion;

  function draw() {
    pending = false;
    drawn = signature();
    const maps = downstreamMaps(node);
    const { light, live } = currentLight(maps);
    // the lit sphere, as lighting.py's lit_sphere (grey 0.7), inside its ring
    sphereContext.fillStyle = "#111";
    sphereContext.fillRect(0, 0, SPHERE_PX, SPHERE_PX);
    const diameter = Math.round(2 * RADIUS_PX);
    const picture = sphereContext.createImageData(diameter, diameter);
    shadeMaps(sphereNormals, diameter * diameter, light, picture.data);
    for (let p = 0; p < diameter * diameter; p++) { // outside the sphere: the ring's background
      if (sphereNormals[2 * diameter * diameter + p] === 0) picture.data.fill(17, 4 * p, 4 * p + 3);
    }
    const corner = Math.round(SPHERE_PX / 2 - RADIUS_PX);
    sphereContext.putImageData(picture, corner, corner);
    sphereContext.strokeStyle = "#555";
    sphereContext.setLineDash([3, 3]);
    sphereContext.beginPath();
    sphereContext.arc(SPHERE_PX / 2, SPHERE_PX / 2, RADIUS_PX, 0, 2 * Math.PI);
    sphereContext.stroke();
    sphereContext.setLineDash([]);
    const azimuth = value("azimuth", 0);
    const elevation = value("elevation", 0);
    const { u, v } = anglesToDrag(azimuth, elevation, OUTER);
    const behind = Math.hypot(u, v) > 1;
    sphereContext.beginPath();
    sphereContext.arc(SPHERE_PX / 2 + u * RADIUS_PX, SPHERE_PX / 2 - v * RADIUS_PX, 6, 0, 2 * Math.PI);
    sphereContext.lineWidth = 2;
    sphereContext.strokeStyle = "#ffd23f";
    sphereContext.fillStyle = behind ? "rgba(0,0,0,0)" : "#ffd23f";
    sphereContext.fill();
    sphereContext.stroke();
    sphereContext.lineWidth = 1;
    // the face
    if (maps) {
      if (face.width !== maps.width || face.height !== maps.height) {
        face.width = maps.width;
        face.height = maps.height;
      }
      const image = faceContext.createImageData(maps.width, maps.height);
      shadeMaps(maps.data, maps.width * maps.height, light, image.data);
      faceContext.putImageData(image, 0, 0);
      root.dataset.previewUpdates = String(Number(root.dataset.previewUpdates) + 1);
    } else {
      faceContext.fillStyle = "#111";
      faceContext.fillRect(0, 0, face.width, face.height);
      faceContext.fillStyle = "#999";
      faceContext.font = "14px sans-serif";
      faceContext.textAlign = "center";
      faceContext.fillText("Run the graph once:", face.width / 2, face.height / 2 - 10);
      faceContext.fillText("the face shows here", face.width / 2, face.height / 2 + 10);
    }
    root.dataset.state = maps ? "face" : "waiting";
    caption.textContent = `az ${azimuth.toFixed(0)}°  el ${elevation.toFixed(0)}°  intensity ${value("intensity", 0).toFixed(2)}  `
      + `ambient ${value("ambient", 0).toFixed(2)}` + (live ? "  (wheel / shift+wheel)" : "  (preview: last run; live in sliders mode)");
  }

  const handle = {
    refresh() {
      if (pending) return;
      pending = true;
      (globalThis.requestAnimationFrame ?? ((f) => setTimeout(f, 16)))(draw);
    },
  };
  handles.add(handle);

  function pointerTo(event) {
    const rect = sphere.getBoundingClientRect();
    if (!rect.width || !rect.height) return;
    // the canvas keeps its aspect (object-fit: contain): measure from its centre in units of its shorter side
    const side = Math.min(rect.width, rect.height);
    const u = ((event.clientX - rect.left - rect.width / 2) / side) * SPHERE_PX / RADIUS_PX;
    const v = -((event.clientY - rect.top - rect.height / 2) / side) * SPHERE_PX / RADIUS_PX;
    const { azimuth, elevation } = dragToAngles(u, v, OUTER);
    setWidget(node, "azimuth", azimuth);
    setWidget(node, "elevation", elevation);
    handle.refresh();
  }

  sphere.addEventListener("pointerdown", (event) => {
    if (event.button !== 0) return;
    event.stopPropagation(); // not a node drag (LiteGraph or Vue nodes)
    dragging = true;
    try {
      sphere.setPointerCapture?.(event.pointerId); // keep the drag when the pointer leaves the sphere
    } catch {
      // a pointer the browser does not track (a synthetic event): the drag works while over the sphere
    }
    pointerTo(event);
  });
  sphere.addEventListener("pointermove", (event) => {
    if (!dragging) return;
    event.stopPropagation();
    pointerTo(event);
  });
  const release = (event) => {
    if (!dragging) return;
    dragging = false;
    try {
      sphere.releasePointerCapture?.(event.pointerId);
    } catch {
      // not captured
    }
    commitChange();
  };
  sphere.addEventListener("pointerup", release);
  sphere.addEventListener("pointercancel", release);
  sphere.addEventListener("wheel", (event) => {
    const name = event.shiftKey ? "ambient" : "intensity";
    const widget = widgetOf(node, name);
    if (!widget) return;
    event.preventDefault(); // the wheel turns the light's knob here, it does not zoom the canvas
    event.stopPropagation();
    const step = Number(inputSpecs[name]?.[1]?.step) > 0 ? Number(inputSpecs[name][1].step) : 0.05;
    const delta = event.deltaY || event.deltaX;
    if (!delta) return;
    setWidget(node, name, widget.value + (delta < 0 ? step : -step));
    handle.refresh();
    clearTimeout(wheelTimer);
    wheelTimer = setTimeout(commitChange, COMMIT_AFTER_WHEEL_MS);
  }, { passive: false });

  // the sliders, typed values and loaded workflows move the marker too
  for (const name of ["mode", "azimuth", "elevation", "intensity", "ambient", "color"]) {
    const widget = widgetOf(node, name);
    if (!widget) continue;
    const callback = widget.callback;
    widget.callback = function (...args) {
      const result = callback?.apply(this, args);
      handle.refresh();
      return result;
    };
  }
  const onConfigure = node.onConfigure;
  node.onConfigure = function (...args) {
    const result = onConfigure?.apply(this, args);
    handle.refresh();
    return result;
  };
  const onRemoved = node.onRemoved;
  node.onRemoved = function (...args) {
    handles.delete(handle);
    return onRemoved?.apply(this, args);
  };

  const widget = node.addDOMWidget("light_handle", "diffusionrig_light_handle", root, {
    serialize: false, // not an input of the node: neither in the prompt ...
    hideOnZoom: false,
    getValue: () => undefined,
    setValue: () => {},
    getMinHeight: () => 230,
    onDraw: () => { if (signature() !== drawn) handle.refresh(); }, // LiteGraph redraws often: only on a change
  });
  if (widget) widget.serialize = false; // ... nor in the workflow's widgets_values
  if (Array.isArray(node.size) && node.size[0] < MIN_WIDTH) node.setSize?.([MIN_WIDTH, node.size[1]]);
  handle.refresh();
}

app?.registerExtension?.({
  name: "comfy-diffusionrig.LightHandle",
  beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name === RELIGHT) inputSpecs = nodeData.input?.required ?? {};
    if (nodeData?.name !== RENDER_BUFFERS || !nodeType?.prototype) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output, ...rest) {
      const result = onExecuted?.apply(this, [output, ...rest]);
      const entry = output?.[UI_KEY]?.[0];
      if (entry?.filename) {
        loadMaps(this, entry).catch((err) => console.warn(`comfy-diffusionrig light handle: no preview maps: ${err}`));
      }
      return result;
    };
  },
  nodeCreated(node) {
    if (classOf(node) !== RELIGHT) return;
    try {
      addHandle(node);
    } catch (err) {
      console.warn(`comfy-diffusionrig light handle: not shown on this Relight node: ${err}`);
    }
  },
});
