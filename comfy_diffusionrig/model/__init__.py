"""The DiffusionRig networks and sampling: UNet and global encoder, noise schedule and samplers, feature cache, LoRA, checkpoints."""
