"""Named lighting setups, kept free of torch so the command line can list them instantly."""

from __future__ import annotations

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
