"""Named lighting setups and preset files (a light and/or a rig edit as JSON), kept free of torch so the
command line can list and check them instantly."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

# Named lighting setups (portrait photography and film), as sh_from_direction arguments.
# azimuth: + = from image right; elevation: + = from above; color: RGB in 0..1.
LIGHT_PRESETS: dict[str, dict] = {
    "rembrandt": dict(azimuth=45.0, elevation=35.0, intensity=1.0, ambient=0.35, color=(1.0, 1.0, 1.0)),
    "loop": dict(azimuth=30.0, elevation=25.0, intensity=0.9, ambient=0.45, color=(1.0, 1.0, 1.0)),
    "split": dict(azimuth=90.0, elevation=0.0, intensity=1.0, ambient=0.3, color=(1.0, 1.0, 1.0)),
    "butterfly": dict(azimuth=0.0, elevation=50.0, intensity=0.9, ambient=0.45, color=(1.0, 1.0, 1.0)),
    "flat": dict(azimuth=0.0, elevation=10.0, intensity=0.4, ambient=0.9, color=(1.0, 1.0, 1.0)),
    "rim": dict(azimuth=150.0, elevation=20.0, intensity=1.2, ambient=0.35, color=(1.0, 1.0, 1.0)),
    "under": dict(azimuth=0.0, elevation=-50.0, intensity=1.0, ambient=0.3, color=(1.0, 1.0, 1.0)),
    "golden hour": dict(azimuth=-70.0, elevation=10.0, intensity=1.0, ambient=0.45, color=(1.0, 0.77, 0.53)),
    "blue hour": dict(azimuth=40.0, elevation=30.0, intensity=0.5, ambient=0.6, color=(0.66, 0.77, 1.0)),
    "candlelight": dict(azimuth=-30.0, elevation=-10.0, intensity=0.9, ambient=0.25, color=(1.0, 0.69, 0.38)),
    "overcast": dict(azimuth=0.0, elevation=80.0, intensity=0.35, ambient=0.85, color=(0.91, 0.94, 1.0)),
}


# --- Preset files: a light and/or a rig edit as small versioned JSON, shareable like workflows ---------------------
#
# {"format": "comfy-diffusionrig preset", "version": 1, "name": "...",
#  "light": {"sh": 9 rows of [r, g, b] (DECA SH light code),
#            "sliders": {what made it: Relight's azimuth/elevation/intensity/ambient/color, or an environment's
#                        file/yaw/exposure; informational, the sh is what is applied}},
#  "edit": {"expression": 50 FLAME expression coefficients (absolute), "jaw_pose": axis-angle [3] (absolute),
#           "head_turn": {"yaw": deg, "pitch": deg, "roll": deg} on top of the face's own pose (see rig.edit_pose)}}
# "light" and "edit" and every entry of "edit" are optional; at least one of light / edit is present.

PRESET_FORMAT = "comfy-diffusionrig preset"
PRESET_VERSION = 1
_EDIT_LENGTHS = {"expression": 50, "jaw_pose": 3}
_TURN_KEYS = ("yaw", "pitch", "roll")


class PresetError(ValueError):
    """A preset file that cannot be used; the message names the file and what is wrong."""


def _numbers(value, length: int, what: str, source: str) -> list[float]:
    if not isinstance(value, list) or len(value) != length or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
        raise PresetError(f"{source}: {what} must be a list of {length} finite numbers")
    return [float(v) for v in value]


def check_preset(document, source: str = "preset") -> dict:
    """Validate a preset document (module comment above) and return it with numbers as floats.

    source: the file name (or a description) used in error messages.  Raises PresetError.
    """
    if not isinstance(document, dict) or document.get("format") != PRESET_FORMAT:
        raise PresetError(f"{source}: not a comfy-diffusionrig preset (no \"format\": \"{PRESET_FORMAT}\" entry)")
    version = document.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise PresetError(f"{source}: preset version {version!r} is not a positive integer")
    if version > PRESET_VERSION:
        raise PresetError(f"{source}: preset version {version} was written by a newer comfy-diffusionrig (this one "
                          f"reads up to version {PRESET_VERSION}); update the pack")
    unknown = sorted(set(document) - {"format", "version", "name", "light", "edit"})
    if unknown:
        raise PresetError(f"{source}: unknown preset entries {unknown}")
    out = {"format": PRESET_FORMAT, "version": PRESET_VERSION, "name": str(document.get("name", ""))}
    light = document.get("light")
    if light is not None:
        if not isinstance(light, dict) or "sh" not in light:
            raise PresetError(f"{source}: \"light\" must be an object with an \"sh\" entry (9 rows of [r, g, b])")
        sh = light["sh"]
        if not isinstance(sh, list) or len(sh) != 9:
            raise PresetError(f"{source}: light sh must have 9 rows of [r, g, b] (DECA's SH light code)")
        entry = {"sh": [_numbers(row, 3, f"light sh row {i}", source) for i, row in enumerate(sh)]}
        sliders = light.get("sliders")
        if sliders is not None:
            if not isinstance(sliders, dict):
                raise PresetError(f"{source}: light sliders must be an object of name: value")
            entry["sliders"] = dict(sliders)
        out["light"] = entry
    edit = document.get("edit")
    if edit is not None:
        if not isinstance(edit, dict):
            raise PresetError(f"{source}: \"edit\" must be an object")
        unknown = sorted(set(edit) - {*_EDIT_LENGTHS, "head_turn"})
        if unknown:
            raise PresetError(f"{source}: unknown edit entries {unknown} (known: expression, jaw_pose, head_turn)")
        entry = {key: _numbers(edit[key], length, f"edit {key}", source)
                 for key, length in _EDIT_LENGTHS.items() if key in edit}
        if "head_turn" in edit:
            turn = edit["head_turn"]
            if not isinstance(turn, dict) or set(turn) - set(_TURN_KEYS):
                raise PresetError(f"{source}: edit head_turn must be an object with yaw, pitch, roll (degrees)")
            values = _numbers([turn.get(k, 0.0) for k in _TURN_KEYS], 3, "edit head_turn", source)
            entry["head_turn"] = dict(zip(_TURN_KEYS, values))
        out["edit"] = entry
    if "light" not in out and "edit" not in out:
        raise PresetError(f"{source}: the preset holds neither a light nor an edit")
    return out


def make_preset(name: str = "", sh=None, sliders: dict | None = None, edit: dict | None = None) -> dict:
    """A preset document from an SH light (9 rows of 3 numbers, e.g. `light.tolist()`) and/or an edit.

    Numbers are rounded to 6 decimals (far below what a picture shows) so files stay small and diff well.
    """
    document = {"format": PRESET_FORMAT, "version": PRESET_VERSION, "name": name}
    if sh is not None:
        document["light"] = {"sh": [[round(float(v), 6) for v in row] for row in sh]}
        if sliders:
            document["light"]["sliders"] = sliders
    if edit:
        document["edit"] = edit
    return check_preset(document, f"preset {name!r}")


_NUMBER_LIST = re.compile(r"\[\s*(-?[0-9][-+0-9.eE]*(?:,\s*-?[0-9][-+0-9.eE]*)*)\s*\]")


def preset_json(document: dict) -> str:
    """The file text of a preset: indented, each list of numbers (an SH row, a colour) on one line."""
    text = json.dumps(check_preset(document), indent=1)
    return _NUMBER_LIST.sub(lambda m: "[" + ", ".join(v.strip() for v in m.group(1).split(",")) + "]", text) + "\n"


def save_preset(path, document: dict, overwrite: bool = False) -> Path:
    """Write a preset file atomically; refuses to replace an existing file unless overwrite."""
    path = Path(path)
    if path.suffix.lower() != ".json":
        path = path.with_name(path.name + ".json")
    if path.exists() and not overwrite:
        raise FileExistsError(f"preset {path} already exists; choose another name or allow overwriting")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(preset_json(document))
    os.replace(temporary, path)
    return path


def load_preset(path) -> dict:
    """Read and validate a preset file; PresetError (a ValueError) naming the file when it is unusable."""
    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"preset {path} not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PresetError(f"{path}: not a JSON preset file ({exc})") from None
    return check_preset(document, str(path))


def light_preset_file_name(name: str) -> str:
    """File name of a named light setup in the pack's presets/ folder: 'golden hour' -> light_golden_hour.json."""
    return "light_" + name.replace(" ", "_") + ".json"
