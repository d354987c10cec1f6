// Spherical-harmonics shading of the pack's renderer, in the browser: no DOM, no imports, so Node.js runs it too
// (tests/test_light_handle.py checks it against comfy_diffusionrig/face/lighting.py and render_layers).
//
// Conventions of face/lighting.py: a light is DECA's code, 9 order-2 SH coefficients per RGB channel, stored here
// as 27 numbers light[k * 3 + c]; a normal n = (x image right, y up, z towards the camera) shades
// sum_k light[k, c] * basis_k(n) with basis = [1, x, y, z, xy, xz, yz, x^2 - y^2, 3z^2 - 1] * SH_CONSTANTS,
// unclamped; the shaded buffer is albedo * shading, clipped to 0..1 only as a picture.

const PI = Math.PI;
const BAND1 = (2 * PI / 3) * Math.sqrt(3 / (4 * PI));
const BAND2 = (PI / 4) * 3 * Math.sqrt(5 / (12 * PI));

// DECA SH constants (decalib renderer), computed in float64 and rounded to float32 once, as lighting.py does
export const SH_CONSTANTS = Float64Array.from([
  1 / Math.sqrt(4 * PI), BAND1, BAND1, BAND1, BAND2, BAND2, BAND2,
  (PI / 4) * (3 / 2) * Math.sqrt(5 / (12 * PI)),
  (PI / 4) * (1 / 2) * Math.sqrt(5 / (4 * PI)),
], Math.fround);

// Radiance-to-light-code weight of each basis function (lighting.py `_sh_weights`): cosine lobe * norm^2 / constant
const COSINE_LOBE = [PI, 2 * PI / 3, 2 * PI / 3, 2 * PI / 3, PI / 4, PI / 4, PI / 4, PI / 4, PI / 4];
const NORM_SQ = [1 / (4 * PI), 3 / (4 * PI), 3 / (4 * PI), 3 / (4 * PI), 15 / (4 * PI), 15 / (4 * PI),
  15 / (4 * PI), 15 / (16 * PI), 5 / (16 * PI)];
const SH_WEIGHTS = COSINE_LOBE.map((lobe, k) => lobe * NORM_SQ[k] / SH_CONSTANTS[k]);

function polynomials(x, y, z) {
  return [1, x, y, z, x * y, x * z, y * z, x * x - y * y, 3 * z * z - 1];
}

/** Unit vector towards the light (lighting.py `light_direction`): azimuth 0 = from the camera, positive = from image
 * right; elevation positive = from above; degrees. */
export function lightDirection(azimuthDeg, elevationDeg) {
  const a = azimuthDeg * PI / 180;
  const e = elevationDeg * PI / 180;
  return [Math.sin(a) * Math.cos(e), Math.sin(e), Math.cos(a) * Math.cos(e)];
}

/** The light of Relight's sliders mode (lighting.py `sh_from_direction`): 27 numbers, light[k * 3 + c].
 * color: [r, g, b] in 0..1. */
export function lightFromSliders(azimuthDeg, elevationDeg, intensity, ambient, color = [1, 1, 1]) {
  const [x, y, z] = lightDirection(azimuthDeg, elevationDeg);
  const poly = polynomials(x, y, z);
  const light = new Float64Array(27);
  for (let k = 0; k < 9; k++) {
    let value = poly[k] * SH_WEIGHTS[k] * intensity;
    if (k === 0) value += ambient / SH_CONSTANTS[0]; // uniform irradiance lives in the constant band only
    for (let c = 0; c < 3; c++) light[k * 3 + c] = Math.fround(value * color[c]);
  }
  return light;
}

/** "#RRGGBB" -> [r, g, b] in 0..1, or null when it is not a hex colour (Relight then reports the error). */
export function parseColor(text) {
  const match = /^#?([0-9a-f]{6})$/i.exec(String(text).trim());
  if (!match) return null;
  const v = parseInt(match[1], 16);
  return [(v >> 16) / 255, ((v >> 8) & 255) / 255, (v & 255) / 255];
}

// The light folded with the constants: shading_c(n) = sum_k coeff[k * 3 + c] * polynomial_k(n)
function folded(light) {
  const coeff = new Float64Array(27);
  for (let k = 0; k < 9; k++) for (let c = 0; c < 3; c++) coeff[k * 3 + c] = light[k * 3 + c] * SH_CONSTANTS[k];
  return coeff;
}

/** Shade maps into RGBA bytes: out[4p + c] = 255 * clip(albedo_c * shading_c(normal), 0, 1), alpha 255 (the
 * Uint8ClampedArray rounds and clips). maps: Float32Array [6, H * W] planar (normal x, y, z, albedo r, g, b: the
 * .npy of Render Buffers' preview), light: 27 numbers; out: Uint8ClampedArray(4 * H * W), returned. */
export function shadeMaps(maps, pixels, light, out = new Uint8ClampedArray(4 * pixels)) {
  const q = folded(light);
  // one channel's coefficients in locals: this loop runs on every pointer move
  const [r0, g0, b0, r1, g1, b1, r2, g2, b2, r3, g3, b3, r4, g4, b4, r5, g5, b5, r6, g6, b6, r7, g7, b7, r8, g8, b8] = q;
  const ny = pixels, nz = 2 * pixels, ar = 3 * pixels, ag = 4 * pixels, ab = 5 * pixels;
  for (let p = 0, o = 0; p < pixels; p++, o += 4) {
    const red = maps[ar + p], green = maps[ag + p], blue = maps[ab + p];
    out[o + 3] = 255;
    if (red === 0 && green === 0 && blue === 0) { // outside the face (the renderer's albedo is 0 there)
      out[o] = out[o + 1] = out[o + 2] = 0;
      continue;
    }
    const x = maps[p], y = maps[ny + p], z = maps[nz + p];
    const xy = x * y, xz = x * z, yz = y * z, xx = x * x - y * y, zz = 3 * z * z - 1;
    out[o] = 255 * red * (r0 + r1 * x + r2 * y + r3 * z + r4 * xy + r5 * xz + r6 * yz + r7 * xx + r8 * zz);
    out[o + 1] = 255 * green * (g0 + g1 * x + g2 * y + g3 * z + g4 * xy + g5 * xz + g6 * yz + g7 * xx + g8 * zz);
    out[o + 2] = 255 * blue * (b0 + b1 * x + b2 * y + b3 * z + b4 * xy + b5 * xz + b6 * yz + b7 * xx + b8 * zz);
  }
  return out;
}

/** The sphere's normals seen from the camera (lighting.py `lit_sphere`), grey albedo 0.7, as shadeMaps' maps
 * (black outside the sphere): Float32Array [6, size * size]. */
export function sphereMaps(size, albedo = 0.7) {
  const pixels = size * size;
  const maps = new Float32Array(6 * pixels);
  for (let row = 0; row < size; row++) {
    const y = -(((row + 0.5) / size) * 2 - 1);
    for (let col = 0; col < size; col++) {
      const x = ((col + 0.5) / size) * 2 - 1;
      const p = row * size + col;
      if (x * x + y * y >= 1) continue;
      maps[p] = x;
      maps[pixels + p] = y;
      maps[2 * pixels + p] = Math.sqrt(1 - x * x - y * y);
      for (let c = 0; c < 3; c++) maps[(3 + c) * pixels + p] = albedo;
    }
  }
  return maps;
}

// The handle: a point (u image right, v up) in units of the sphere's radius. Inside the disc it is the sphere's
// normal there, so the light comes from where the pointer is and that point is lit brightest; the ring from the
// rim out to radius `outer` continues over the rim to the back (outer = from straight behind), for rim lights.

/** Pointer on the handle -> {azimuth, elevation} in degrees (lighting.py's convention). */
export function dragToAngles(u, v, outer = 2) {
  let r = Math.hypot(u, v);
  let d;
  if (r <= 1) {
    d = [u, v, Math.sqrt(Math.max(0, 1 - r * r))];
  } else {
    r = Math.min(r, outer);
    const theta = PI / 2 + ((r - 1) / (outer - 1)) * (PI / 2); // angle from the camera direction
    const s = Math.sin(theta) / Math.hypot(u, v);
    d = [u * s, v * s, Math.cos(theta)];
  }
  return { azimuth: Math.atan2(d[0], d[2]) * 180 / PI, elevation: Math.asin(Math.max(-1, Math.min(1, d[1]))) * 180 / PI };
}

/** {azimuth, elevation} in degrees -> where the handle's marker goes, {u, v} (the inverse of dragToAngles). */
export function anglesToDrag(azimuthDeg, elevationDeg, outer = 2) {
  const [x, y, z] = lightDirection(azimuthDeg, elevationDeg);
  if (z >= 0) return { u: x, v: y };
  const side = Math.hypot(x, y);
  const r = 1 + ((Math.acos(Math.max(-1, z)) - PI / 2) / (PI / 2)) * (outer - 1);
  return side < 1e-9 ? { u: r, v: 0 } : { u: (x / side) * r, v: (y / side) * r };
}

/** A NumPy .npy file (format 1.x/2.x, little-endian float32, C order) -> {shape, data: Float32Array}. */
export function parseNpy(buffer) {
  const bytes = new Uint8Array(buffer);
  if (bytes[0] !== 0x93 || String.fromCharCode(...bytes.slice(1, 6)) !== "NUMPY") {
    throw new Error("not a .npy file");
  }
  const view = new DataView(buffer);
  const major = bytes[6];
  const headerLength = major === 1 ? view.getUint16(8, true) : view.getUint32(8, true);
  const start = major === 1 ? 10 : 12;
  const header = new TextDecoder().decode(bytes.slice(start, start + headerLength));
  if (!/'descr':\s*'<f4'/.test(header) || /'fortran_order':\s*True/.test(header)) {
    throw new Error(`expected a little-endian float32 C-order array, got ${header.trim()}`);
  }
  const shape = (/'shape':\s*\(([^)]*)\)/.exec(header)?.[1] ?? "").split(",").filter((s) => s.trim()).map(Number);
  const offset = start + headerLength;
  const count = shape.reduce((a, b) => a * b, 1);
  return { shape, data: new Float32Array(buffer.slice(offset, offset + 4 * count)) };
}
