"""The face model: FLAME and its files, the DECA fit, the rasterizer and buffers, lighting, environments, rigs and presets."""
