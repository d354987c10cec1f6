// Benchmark: updates per second of the light handle's face preview (web/js/sh_shading.js), under Node.js.
//
// One update is what the browser does per pointer move: the sliders' light (lightFromSliders) and the SH shading
// of a face's normal and albedo maps into RGBA bytes (shadeMaps), here at 256 x 256 px with every pixel covered
// (a real face covers about half: this is the worst case). Drawing the bytes on the canvas (putImageData) is the
// browser's and not counted; tests/test_frontend.py prints the rate in headless Chromium, drawing included.
//
//     node benchmarks/bench_light_preview.mjs            # 256 px, 3 s
//     node benchmarks/bench_light_preview.mjs 512 5      # size, seconds
import os from "node:os";
import { lightFromSliders, shadeMaps, sphereMaps } from "../web/js/sh_shading.js";

const size = Number(process.argv[2] ?? 256);
const seconds = Number(process.argv[3] ?? 3);
const pixels = size * size;
const maps = new Float32Array(6 * pixels);
let seed = 1;
const random = () => ((seed = (seed * 16807) % 2147483647) / 2147483647);
for (let p = 0; p < pixels; p++) { // random unit normals facing the camera, random albedo
  const x = random() * 1.4 - 0.7, y = random() * 1.4 - 0.7;
  maps[p] = x;
  maps[pixels + p] = y;
  maps[2 * pixels + p] = Math.sqrt(Math.max(0, 1 - x * x - y * y));
  for (let c = 0; c < 3; c++) maps[(3 + c) * pixels + p] = random();
}
const out = new Uint8ClampedArray(4 * pixels);

// updates per wall-clock second, and per second of this process's CPU time (on a machine shared with other work
// the second is what one idle core gives); the best of three rounds, the least disturbed
function rate(shade) {
  for (let i = 0; i < 200; i++) shade(i); // warm-up (the JIT optimises the loop after some calls)
  let best = { wall: 0, cpu: 0 };
  for (let round = 0; round < 3; round++) {
    let count = 0;
    const start = performance.now();
    const cpu = process.cpuUsage();
    while (performance.now() - start < (seconds * 1000) / 3) shade(count++);
    const used = process.cpuUsage(cpu);
    const wall = count / ((performance.now() - start) / 1000);
    const perCpu = count / ((used.user + used.system) / 1e6);
    best = { wall: Math.max(best.wall, wall), cpu: Math.max(best.cpu, perCpu) };
  }
  return best;
}
const shown = (r) => `${r.wall.toFixed(0)} updates/s (${r.cpu.toFixed(0)} per CPU second, ${(1000 / r.cpu).toFixed(2)} ms)`;

const face = rate((i) => shadeMaps(maps, pixels, lightFromSliders(-90 + (i % 180), 20, 0.9, 0.4, [1, 0.9, 0.8]), out));
const sphereSize = 116; // the handle's sphere (light_handle.js: 2 x 0.3 x 192 px)
const sphere = sphereMaps(sphereSize);
const sphereOut = new Uint8ClampedArray(4 * sphereSize * sphereSize);
const both = rate((i) => {
  const light = lightFromSliders(-90 + (i % 180), 20, 0.9, 0.4, [1, 0.9, 0.8]);
  shadeMaps(maps, pixels, light, out);
  shadeMaps(sphere, sphereSize * sphereSize, light, sphereOut);
});
console.log(`Node ${process.version}, ${os.cpus()[0]?.model ?? "unknown CPU"}, load average ${os.loadavg()[0].toFixed(1)}`);
console.log(`face preview ${size} x ${size} px: ${shown(face)}`);
console.log(`face + lit sphere (${sphereSize} px), one pointer move: ${shown(both)}; goal: 30 updates/s`);
