"""The samplers of an edit and their named settings (presets), kept free of torch so the command line
can list and check them instantly."""

from __future__ import annotations

# Samplers of an edit (diffusion.SAMPLERS holds their functions under these names).
SAMPLER_NAMES = ("ddim", "dpmpp_2m")

# Named sampler settings for callers that pick by name (nodes, CLI, demo); cache_interval > 1 wraps the
# model in feature_cache.FeatureCache. Chosen from the sampler table of `comfy-diffusionrig demo` (its
# personalized 32 px model, 48 held-out edits; edit PSNR against ddim20's, the official 40 calls):
#   dpmpp_2m 10: 19 UNet calls per edit, edit +0.08 dB, reconstruction +7.0 dB
#   dpmpp_2m 8:  15 calls, edit +0.04 dB, reconstruction +5.1 dB            -> "fast"
#   dpmpp_2m 7:  13 calls, edit -0.43 dB (6 steps: -1.9 dB)                 -> "faster" (previews)
#   caching costs more than it saves: ddim20 + cache 2 (20 full calls) -0.05 dB, + cache 3 (14 full)
#   -0.29 dB, + cache 4 -1.9 dB; dpmpp_2m 12 + cache 2 -1.1 dB. (benchmarks/bench_quality.py's own
#   model, 12 edits, agreed: dpmpp_2m 10 +0.03, 8 -0.06 dB.)
# Speed is UNet calls (benchmarks/bench_sample.py: the official model at 256 px, CPU bf16):
# 40 -> 15 (fast) -> 13 (faster) per edit, on top of the precision's own speed-up.
SAMPLING_PRESETS: dict[str, dict] = {
    "official": {"sampler": "ddim", "steps": 20, "cache_interval": 1},  # the paper's ddim20: 40 UNet calls per edit
    # measured by `comfy-diffusionrig demo` on its personalized model (48 held-out edits, PSNR against ddim20):
    "fast": {"sampler": "dpmpp_2m", "steps": 8, "cache_interval": 1},  # 15 calls, +0.04 dB: as good as official
    "faster": {"sampler": "dpmpp_2m", "steps": 7, "cache_interval": 1},  # 13 calls, -0.4 dB: previews (6 falls off)
}
