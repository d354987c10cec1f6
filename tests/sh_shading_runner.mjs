// Runs functions of web/js/sh_shading.js for tests/test_light_handle.py: reads a JSON list of calls on stdin,
// {"fn": name, "args": [...]} where an argument {"npy": path} is that file's float32 data (parseNpy) and
// {"floats": [...]} a Float32Array; prints one JSON list of results (typed arrays as plain lists).
import { readFileSync } from "node:fs";
import * as sh from "../web/js/sh_shading.js";

function argument(value) {
  if (value && typeof value === "object" && "npy" in value) {
    const bytes = readFileSync(value.npy);
    return sh.parseNpy(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength)).data;
  }
  if (value && typeof value === "object" && "floats" in value) return Float32Array.from(value.floats);
  return value;
}

const calls = JSON.parse(readFileSync(0, "utf8"));
const results = calls.map(({ fn, args }) => {
  const result = sh[fn](...args.map(argument));
  return ArrayBuffer.isView(result) ? Array.from(result) : result;
});
process.stdout.write(JSON.stringify(results));
