"""nodes/host.py without ComfyUI: fresh results after a file is replaced (IS_CHANGED), caches kept out of the
model folders, FLAME files found across several folders, and models left alone outside ComfyUI.
(Inside ComfyUI, model management and the Free-memory button are checked by test_comfyui.py.)"""

import os
import shutil

import pytest
import torch
from PIL import Image

from comfy_diffusionrig import save_diffusionrig
from comfy_diffusionrig.face.deca import FLAME_FILES
from comfy_diffusionrig.model.unet import DiffusionRig
from nodes import face_nodes, host, model_nodes, train_nodes

from test_nodes import SMALL, models_dir  # noqa: F401  (fixture)

LOADER = model_nodes.LoadDiffusionRigModel


def _bump_mtime(path, seconds=5):
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + seconds * 10**9))


def test_replacing_the_checkpoint_changes_is_changed_and_the_loaded_weights(models_dir):
    path = models_dir / "diffusionrig" / "small.safetensors"
    before = LOADER.IS_CHANGED(ckpt_name="small.safetensors", precision="fp32")
    assert LOADER.IS_CHANGED(ckpt_name="small.safetensors", precision="fp32") == before, "must not always re-run"
    (old,) = LOADER().load("small.safetensors", "fp32")
    torch.manual_seed(1)
    save_diffusionrig(DiffusionRig(SMALL), path, overwrite=True)  # another model, same name
    _bump_mtime(path)  # file systems with coarse timestamps: the replacement must look newer
    assert LOADER.IS_CHANGED(ckpt_name="small.safetensors", precision="fp32") != before
    (new,) = LOADER().load("small.safetensors", "fp32")
    weight = lambda handle: handle.run(lambda model: model.encoder.conv1.weight)  # noqa: E731
    assert not torch.equal(weight(old), weight(new))


def test_is_changed_follows_same_size_rewrites_the_config_sidecar_and_the_lora(models_dir):
    folder = models_dir / "diffusionrig"
    (folder / "model.pt").write_bytes(b"a" * 100)
    (folder / "lora.safetensors").write_bytes(b"l" * 10)
    value = lambda: LOADER.IS_CHANGED(ckpt_name="model.pt", lora_name="lora.safetensors")  # noqa: E731
    first = value()
    (folder / "model.pt").write_bytes(b"b" * 100)  # same size: only the modification time tells
    _bump_mtime(folder / "model.pt")
    second = value()
    assert second != first
    (folder / "model.json").write_text("{}")  # a .pt's training kwargs live next to it
    third = value()
    assert third != second
    (folder / "lora.safetensors").write_bytes(b"m" * 11)
    assert value() != third
    assert LOADER.IS_CHANGED(ckpt_name="model.pt", lora_name="none") != value()


def test_deca_is_changed_follows_the_deca_and_flame_files(tmp_path, monkeypatch):
    monkeypatch.setenv("COMFY_DIFFUSIONRIG_MODELS", str(tmp_path))
    (tmp_path / "deca").mkdir()
    (tmp_path / "flame").mkdir()
    (tmp_path / "deca" / "deca_model.tar").write_bytes(b"d")
    for name in FLAME_FILES:
        (tmp_path / "flame" / name).write_bytes(b"f")
    value = lambda: face_nodes.LoadDECA.IS_CHANGED(deca_model="deca_model.tar", rasterizer="auto")  # noqa: E731
    first = value()
    assert value() == first
    (tmp_path / "flame" / "FLAME_texture.npz").write_bytes(b"ff")
    second = value()
    assert second != first
    (tmp_path / "deca" / "deca_model.tar").write_bytes(b"dd")
    assert value() != second


def test_album_folder_is_changed_follows_the_photos_in_it(tmp_path):
    def photo(name, color):
        Image.new("RGB", (8, 8), color).save(tmp_path / name)

    photo("a.png", (255, 0, 0))
    (tmp_path / "notes.txt").write_text("not a photo")
    value = lambda: train_nodes.BuildFaceAlbum.IS_CHANGED(folder=str(tmp_path), size=256)  # noqa: E731
    first = value()
    assert value() == first
    (tmp_path / "notes.txt").write_text("still not a photo, longer")
    assert value() == first, "only the photos count"
    photo("b.png", (0, 255, 0))
    second = value()
    assert second != first
    photo("b.png", (0, 0, 255))
    _bump_mtime(tmp_path / "b.png")
    assert value() != second
    assert train_nodes.BuildFaceAlbum.IS_CHANGED(folder="") == ""
    assert "does not exist" in train_nodes.BuildFaceAlbum.IS_CHANGED(folder=str(tmp_path / "gone"))


def test_model_dropdowns_never_list_cache_or_training_folders(models_dir):
    folder = models_dir / "diffusionrig"
    for name in ("albums/album_0123.pt", "training/anna.pt", "people/anna.safetensors"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"x")
    choices = LOADER.INPUT_TYPES()["required"]["ckpt_name"][0]
    assert choices == ["people/anna.safetensors", "small.safetensors"]


def test_the_album_cache_is_outside_every_model_folder(tmp_path, monkeypatch, demo_models):
    monkeypatch.setenv("COMFY_DIFFUSIONRIG_MODELS", str(demo_models))
    monkeypatch.delenv("COMFY_DIFFUSIONRIG_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    albums = host.cache_dir("albums")
    assert albums == tmp_path / "cache" / "comfy-diffusionrig" / "albums"
    (deca,) = face_nodes.LoadDECA().load("deca_model.tar", "torch")
    out = train_nodes.BuildFaceAlbum().build(deca, size=64, detector="hog", check_identity=False, folder="examples")
    assert len(out["result"][0]) >= 2
    assert len(list(albums.glob("album_*.pt"))) == 1, "the album was not cached in cache_dir('albums')"
    assert not list(demo_models.rglob("album_*")), "an album was written into a model folder"


def test_flame_files_are_found_across_every_flame_folder(tmp_path, monkeypatch, demo_models):
    monkeypatch.setenv("COMFY_DIFFUSIONRIG_MODELS", str(demo_models))
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    for i, name in enumerate(FLAME_FILES):  # half of the files in each folder
        shutil.copy(demo_models / "flame" / name, (first if i < 2 else second) / name)
    (second / FLAME_FILES[0]).write_bytes(b"not FLAME")  # the first folder that has a file wins
    dirs = {"flame": [first, second]}
    monkeypatch.setattr(host, "model_dirs", lambda folder: dirs.get(folder, [demo_models / folder]))
    (deca,) = face_nodes.LoadDECA().load("deca_model.tar", "torch")
    assert deca.run(lambda model: model.flame) is not None
    os.remove(first / FLAME_FILES[1])
    with pytest.raises(FileNotFoundError) as err:
        face_nodes.LoadDECA().load("deca_model.tar", "torch")
    message = str(err.value)
    assert f"Load DECA: {FLAME_FILES[1]} not found in {first}, {second}" in message


def test_outside_comfyui_models_stay_where_they_were_loaded(models_dir):
    (model,) = LOADER().load("small.safetensors", "fp32")
    assert isinstance(model, host.ModelHandle) and model.config == SMALL
    assert model.run(lambda m: next(m.parameters()).device) == torch.device("cpu")


def test_load_face_photo_has_the_upload_button():
    spec = face_nodes.LoadFacePhoto.INPUT_TYPES()["required"]["image"]
    assert spec[1]["image_upload"] is True


def test_loaders_validate_a_missing_file_with_where_it_comes_from(demo_person, monkeypatch):
    """VALIDATE_INPUTS (ComfyUI shows its message instead of "Value not in list"): True for a file that is there;
    for a missing demo file, the node, the file and the command that writes it."""
    monkeypatch.setenv("COMFY_DIFFUSIONRIG_MODELS", str(demo_person))
    rig, loader = face_nodes.LoadFaceRig, model_nodes.LoadDiffusionRigModel
    assert rig.VALIDATE_INPUTS(rig_photo="synthetic_demo_person_1.png") is True
    assert loader.VALIDATE_INPUTS(ckpt_name="synthetic_demo_personalized_32px.safetensors") is True
    command = "`comfy-diffusionrig demo --models <ComfyUI models folder>`"
    message = rig.VALIDATE_INPUTS(rig_photo="synthetic_demo_person_7.png")
    assert message.startswith("Load Face Rig: ") and "'synthetic_demo_person_7.png' not found" in message
    assert command in message
    message = loader.VALIDATE_INPUTS(ckpt_name="synthetic_demo_personalized_48px.safetensors")
    assert message.startswith("Load DiffusionRig Model: ") and command in message


def test_loaders_store_weights_on_the_offload_device_in_the_run_devices_precision(models_dir, monkeypatch):
    """Inside ComfyUI a loader puts the weights where idle models wait (storage_device, ComfyUI's offload device)
    instead of the GPU, and picks the precision for the device the model will run on: fp16 is refused on the
    CPU, yet a model stored on the CPU to run on a GPU is kept in fp16 there."""
    monkeypatch.setattr(host, "torch_device", lambda: torch.device("cuda"))
    monkeypatch.setattr(model_nodes, "torch_device", host.torch_device)
    (model,) = LOADER().load("small.safetensors", "fp16")
    unet, encoder = model.run(lambda m: (next(m.denoisingUNet.parameters()), next(m.encoder.parameters())))
    assert unet.device.type == "cpu" and unet.dtype == torch.float16
    assert encoder.dtype == torch.float32
    monkeypatch.setattr(model_nodes, "torch_device", lambda: torch.device("cpu"))
    with pytest.raises(ValueError, match="fp16 is not supported on the CPU"):
        LOADER().load("small.safetensors", "fp16")  # running on the CPU: refused as before


def test_one_progress_adapter_gives_comfyui_one_bar_with_previews_and_the_cancel_check(monkeypatch):
    """progress_callback: the library's callback(done, total, **info) as ComfyUI's ProgressBar (made once, on
    the first call, with that call's total), its JPEG preview, and the cancel check on every call."""
    bars, checks = [], []

    class Bar:
        def __init__(self, total):
            self.total, self.updates = total, []
            bars.append(self)

        def update_absolute(self, value, total, preview):
            self.updates.append((value, total, preview if preview is None else (preview[0], preview[1].size)))

    monkeypatch.setattr(host, "IN_COMFYUI", True)
    monkeypatch.setattr(host, "_comfy_utils", type("Utils", (), {"ProgressBar": Bar}))
    monkeypatch.setattr(host, "check_interrupt", lambda: checks.append(1))
    callback = host.progress_callback()
    callback(1, 3, preview=torch.zeros(3, 8, 6))
    callback(2, 3, x0=torch.zeros(1, 3, 8, 8))
    callback(3, 3, loss=0.5, model=None)
    assert len(bars) == 1 and bars[0].total == 3 and len(checks) == 3
    assert bars[0].updates == [(1, 3, ("JPEG", (6, 8))), (2, 3, None), (3, 3, None)]
    video = host.progress_callback(stages=("relight",))
    video(1, 4, stage="track")
    video(5, 10, stage="relight")
    assert len(bars) == 2 and bars[1].total == 10 and bars[1].updates == [(5, 10, None)] and len(checks) == 5

    class Cancelled(Exception):
        pass

    def cancel():
        raise Cancelled

    monkeypatch.setattr(host, "check_interrupt", cancel)
    with pytest.raises(Cancelled):
        host.progress_callback()(1, 3)
    assert len(bars) == 2  # cancel is checked before the bar moves
