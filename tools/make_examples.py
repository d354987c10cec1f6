"""Write the shared example files: the named light presets as preset files, and the example panorama.

    python tools/make_examples.py     # rewrites presets/light_*.json and example_images/studio_key_fill.hdr

The tests check that these files are what this script writes (tests/test_presets.py, tests/test_environment.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from comfy_diffusionrig.face.environment import studio_environment, write_hdr  # noqa: E402
from comfy_diffusionrig.face.lighting import light_preset_document  # noqa: E402
from comfy_diffusionrig.face.presets import LIGHT_PRESETS, light_preset_file_name, preset_json  # noqa: E402

PRESETS_DIR = ROOT / "presets"
STUDIO_HDR = ROOT / "example_images" / "studio_key_fill.hdr"


def main() -> None:
    PRESETS_DIR.mkdir(exist_ok=True)
    for name in LIGHT_PRESETS:
        path = PRESETS_DIR / light_preset_file_name(name)
        path.write_text(preset_json(light_preset_document(name)))
        print(f"wrote {path.relative_to(ROOT)}")
    write_hdr(STUDIO_HDR, studio_environment())
    print(f"wrote {STUDIO_HDR.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
