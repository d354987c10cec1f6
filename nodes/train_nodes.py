"""Personalization nodes: train DiffusionRig on a face album (stage 2) and save the result."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from comfy_diffusionrig import ddim_sample
from comfy_diffusionrig.train.album import build_album
from comfy_diffusionrig.photo.detection import DETECTORS
from comfy_diffusionrig.photo.loading import load_image
from comfy_diffusionrig.model.checkpoints import save_diffusionrig
from comfy_diffusionrig.model.lora import lora_layers, save_lora
from comfy_diffusionrig.demo.plotting import loss_curve
from comfy_diffusionrig.train.loop import TrainConfig, train

from .host import (IMAGE_SUFFIXES, cache_dir, file_fingerprint, image_to_pil, model_to_image, new_model_file,
                   photo_folder, pil_to_image, progress_callback)

CATEGORY = "DiffusionRig/personalize"
TRAINING_SUFFIX = ".dr-train"  # resumable training checkpoints; not listed by the model loader
log = logging.getLogger("comfy_diffusionrig")


def _folder_photos(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


class BuildFaceAlbum:
    DISPLAY_NAME = "Build Face Album"
    DESCRIPTION = ("Builds a personal album from one person's photos (an IMAGE batch and/or a folder): aligns the "
                   "face of each, fits DECA, uses the person's mean face shape and renders the buffers. Photos "
                   "without a face or showing someone else are left out and reported. Albums are cached on disk: "
                   "queueing the same photos again is instant.")
    CATEGORY = CATEGORY
    FUNCTION = "build"
    RETURN_TYPES = ("FACE_ALBUM", "IMAGE", "STRING")
    RETURN_NAMES = ("album", "aligned", "report")
    OUTPUT_TOOLTIPS = ("For Train DiffusionRig.", "The aligned photos kept in the album.",
                       "What was kept and what was left out, and why.")
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "deca": ("DECA_MODEL", {"tooltip": "From Load DECA."}),
            "size": ("INT", {"default": 256, "min": 64, "max": 1024, "step": 64,
                             "tooltip": "Aligned size: the DiffusionRig model's image size (256 official)."}),
            "detector": (list(DETECTORS), {"default": "hog", "tooltip": "Face detector (see Detect & Align Face)."}),
            "check_identity": ("BOOLEAN", {"default": True, "tooltip": "Leave out faces that look like another "
                                                                       "person (dlib identity score)."}),
        }, "optional": {
            "images": ("IMAGE", {"tooltip": "Photos of the person (a batch, e.g. from Load Image Batch)."}),
            "folder": ("STRING", {"default": "", "tooltip": "Or/and a folder of photos of the person: an absolute "
                                                            "path, a folder inside ComfyUI/input/, or 'examples' "
                                                            "for the pack's example images."}),
        }}

    def build(self, deca, size, detector, check_identity, images=None, folder=""):
        node = self.DISPLAY_NAME
        photos, names = [], []
        if images is not None:
            photos += image_to_pil(images, node)
            names += [f"image {i + 1}" for i in range(images.shape[0])]
        if folder.strip():
            for path in _folder_photos(photo_folder(folder, node)):
                try:
                    photos.append(load_image(path))
                    names.append(path.name)
                except ValueError as err:
                    log.warning("%s: %s skipped: %s", node, path.name, err)
        if not photos:
            raise ValueError(f"{node}: no photos; connect an IMAGE batch or give a folder of photos of the person")
        album = deca.run(lambda model: build_album(photos, model, names, size=size, detector=detector,
                                                   check_identity=check_identity, cache_dir=cache_dir("albums"),
                                                   progress=progress_callback()), batch=len(photos))
        text = (f"{len(album)} photo(s) in the album: {', '.join(album.names)}"
                + "".join(f"\nwarning: {w}" for w in album.warnings))
        for warning in album.warnings:
            log.warning("%s: %s", node, warning)
        preview = model_to_image(album.images)
        return {"ui": {"text": [text]}, "result": (album, preview, text)}

    @classmethod
    def IS_CHANGED(cls, folder="", **_):
        # photos added, removed or replaced in the folder must rebuild the album
        if not folder.strip():
            return ""
        try:
            return file_fingerprint(_folder_photos(photo_folder(folder, cls.DISPLAY_NAME)))
        except FileNotFoundError as err:
            return str(err)


class TrainDiffusionRig:
    DISPLAY_NAME = "Train DiffusionRig (personalize)"
    DESCRIPTION = ("Personalizes DiffusionRig on one person's Face Album (stage 2 of the paper): fine-tunes the "
                   "denoiser with the global encoder frozen. Defaults are the official recipe (5000 steps, lr 1e-5, "
                   "batch 4: about 30 min on a GPU, many hours on a CPU). Progress is checkpointed under the save "
                   "name: cancel any time and queue again with the same settings to continue where it stopped.")
    CATEGORY = CATEGORY
    FUNCTION = "train"
    RETURN_TYPES = ("DR_MODEL", "IMAGE")
    RETURN_NAMES = ("dr_model", "loss_curve")
    OUTPUT_TOOLTIPS = ("The personalized model (the input model is left unchanged). Save it with Save "
                       "DiffusionRig Model.", "Loss per step and its running mean.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "dr_model": ("DR_MODEL", {"tooltip": "The base model to personalize (the official stage-1 checkpoint)."}),
            "face_album": ("FACE_ALBUM", {"tooltip": "From Build Face Album: ~20 aligned photos of one person with "
                                                     "their rendered buffers."}),
            "steps": ("INT", {"default": 5000, "min": 1, "max": 100000,
                              "tooltip": "Training steps (official: 5000). Try a few hundred first on a CPU."}),
            "learning_rate": ("FLOAT", {"default": 1e-5, "min": 1e-7, "max": 1e-2, "step": 1e-6, "round": 1e-7,
                                        "tooltip": "Adam learning rate (official full fine-tune: 1e-5; LoRA usually "
                                                   "wants ~1e-4)."}),
            "batch_size": ("INT", {"default": 4, "min": 1, "max": 64,
                                   "tooltip": "Different album photos per step (official: 4)."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF, "control_after_generate": True,
                             "tooltip": "Seed of the photo order, timesteps and noise: same seed, same result."}),
            "lora_rank": ("INT", {"default": 0, "min": 0, "max": 256,
                                  "tooltip": "0 = full fine-tune (official, ~550 MB model). >0 trains low-rank "
                                             "adapters instead: a file of a few MB."}),
            "save_name": ("STRING", {"default": "personalized",
                                     "tooltip": "Name of this run. Its resumable checkpoint is kept in "
                                                "models/diffusionrig/training/<name>.dr-train."}),
        }, "optional": {
            "precision": (["auto", "fp32", "bf16", "fp16"],
                          {"default": "auto", "tooltip": "Mixed precision of the training math; weights stay fp32. "
                                                         "auto: bf16/fp16 on GPUs and bf16 on CPUs that have it."}),
            "gradient_checkpointing": ("BOOLEAN", {"default": False,
                                                   "tooltip": "Recompute activations in the backward pass: much "
                                                              "less memory, ~30 % slower."}),
            "preview_every": ("INT", {"default": 250, "min": 0, "max": 100000,
                                      "tooltip": "Show a 10-step sample of the first album photo every N steps "
                                                 "(0 = never)."}),
            "restart": ("BOOLEAN", {"default": False,
                                    "tooltip": "Ignore and replace an existing checkpoint of this save name "
                                               "instead of resuming it."}),
        }}

    def train(self, dr_model, face_album, steps, learning_rate, batch_size, seed, lora_rank, save_name,
              precision="auto", gradient_checkpointing=False, preview_every=250, restart=False):
        node = self.DISPLAY_NAME
        if len(face_album) < 2:
            raise ValueError(f"{node}: the album has {len(face_album)} photo(s); personalizing needs several "
                             "photos of the person (the paper uses about 20)")
        config = TrainConfig(steps=steps, lr=learning_rate, batch_size=min(batch_size, len(face_album)), seed=seed,
                             precision=precision, gradient_checkpointing=gradient_checkpointing,
                             lora_rank=lora_rank, checkpoint_every=max(1, min(500, steps // 10)),
                             preview_every=preview_every)
        if config.batch_size < batch_size:
            log.warning("%s: the album has %d photos: batch size lowered from %d to %d", node, len(face_album),
                        batch_size, config.batch_size)
        checkpoint = new_model_file("diffusionrig", save_name.strip().removesuffix(".safetensors"), node,
                                    TRAINING_SUFFIX, subfolder="training")
        data = face_album.training_data()
        progress = progress_callback()
        preview_buffers = data.buffers[:1]
        preview_noise = torch.randn(1, *data.images.shape[1:], generator=torch.Generator().manual_seed(seed))
        last_preview = [None]

        def on_step(step, total, loss, **_):
            if step % 50 == 0 or step == total:
                log.info("%s: step %d/%d, loss %.4f", node, step, total, loss)
            progress(step, total, preview=last_preview[0])
            last_preview[0] = None

        def preview(step, model):
            device = model.device
            code = model.encode(data.images[:1].to(device))
            last_preview[0] = ddim_sample(model, preview_buffers.to(device), code, preview_noise.to(device),
                                          steps=10)[0].cpu()

        with torch.inference_mode(False):
            personal = dr_model.copy()  # the loader's cached model must stay the base
            _, losses = personal.run(train, data, config, checkpoint_path=checkpoint, callback=on_step,
                                     resume=not restart, preview=preview, batch=config.batch_size, training=True)
        curve = pil_to_image([loss_curve(losses)])
        return (personal, curve)


class SaveDiffusionRigModel:
    DISPLAY_NAME = "Save DiffusionRig Model"
    DESCRIPTION = ("Saves a DiffusionRig model into models/diffusionrig/ as .safetensors (the whole model, or "
                   "only the LoRA adapters of a LoRA-trained model). Never overwrites a file unless asked.")
    CATEGORY = CATEGORY
    FUNCTION = "save"
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    OUTPUT_TOOLTIPS = ("Where the file was written.",)
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "dr_model": ("DR_MODEL", {"tooltip": "Usually the output of Train DiffusionRig."}),
            "filename": ("STRING", {"default": "personalized",
                                    "tooltip": "File name in models/diffusionrig/ (.safetensors is added)."}),
            "precision": (["fp32", "fp16", "bf16"],
                          {"default": "fp16", "tooltip": "Stored precision; fp16/bf16 halve the file."}),
            "overwrite": ("BOOLEAN", {"default": False, "tooltip": "Replace an existing file of that name."}),
        }}

    def save(self, dr_model, filename, precision, overwrite):
        node = self.DISPLAY_NAME
        path = new_model_file("diffusionrig", filename, node, ".safetensors")
        if path.exists() and not overwrite:
            raise FileExistsError(f"{node}: {path} already exists; choose another file name or turn on overwrite")
        dtype = None if precision == "fp32" else precision
        save = lambda model: (save_lora if lora_layers(model) else save_diffusionrig)(  # noqa: E731
            model, path, dtype=dtype, overwrite=overwrite)
        written = dr_model.run(save, batch=0)  # only reads the weights
        return {"ui": {"text": [str(written)]}, "result": (str(written),)}


NODE_CLASS_MAPPINGS = {
    "DiffusionRigBuildAlbum": BuildFaceAlbum,
    "DiffusionRigTrain": TrainDiffusionRig,
    "DiffusionRigSaveModel": SaveDiffusionRigModel,
}
NODE_DISPLAY_NAME_MAPPINGS = {key: cls.DISPLAY_NAME for key, cls in NODE_CLASS_MAPPINGS.items()}
