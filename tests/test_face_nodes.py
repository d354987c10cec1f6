"""The face nodes run directly (as ComfyUI's executor would call them) on the offline demo assets, through a
whole pipeline: Load Face Photo -> Detect & Align Face -> DECA Fit -> Relight / Edit Expression & Pose ->
Render Buffers -> Encode Global Code -> Sampler -> Paste Face Back -> Face Identity Similarity, and Rig Sweep.

The demo DECA and DiffusionRig have random weights, so the tests check behaviour that holds for any weights:
shapes, ranges, what an edit may and may not change, exactness of paste-back, and the error messages.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from comfy_diffusionrig.photo.loading import load_image
from comfy_diffusionrig.face.rig import sweep_values
from nodes import face_nodes as fn
from nodes import host
from nodes import model_nodes as mn

DECA_FILE = "deca_model.tar"
DR_FILE = "synthetic_random_diffusionrig.pt"
WHITE = "#FFFFFF"


@pytest.fixture(scope="module", autouse=True)
def models_env(demo_models):
    with pytest.MonkeyPatch.context() as mp:  # nodes/host.py finds models here when ComfyUI is absent
        mp.setenv("COMFY_DIFFUSIONRIG_MODELS", str(demo_models))
        yield demo_models


def two_face_photo() -> torch.Tensor:
    """Astronaut (small face, left) and Grace Hopper (large face, right) side by side on grey: [1, 330, 560, 3]."""
    astronaut = load_image(host.EXAMPLE_IMAGES / "astronaut.png").crop((110, 10, 330, 230))
    grace = load_image(host.EXAMPLE_IMAGES / "grace_hopper.jpg").crop((140, 90, 410, 390))
    canvas = Image.new("RGB", (560, 330), (128, 128, 128))
    canvas.paste(astronaut, (10, 50))
    canvas.paste(grace, (270, 15))
    return host.pil_to_image([canvas])


def _halves(shaded: torch.Tensor, covered: torch.Tensor) -> tuple[float, float]:
    """Mean grey level of the covered pixels in the left and right half of one [3, H, W] render."""
    grey, width = shaded.mean(0), shaded.shape[-1]
    left, right = covered.clone(), covered.clone()
    left[:, width // 2:] = False
    right[:, :width // 2] = False
    return float(grey[left].mean()), float(grey[right].mean())


@pytest.fixture(scope="module")
def pipe(models_env):
    """Everything up to the fitted rigs, shared by the tests of this module."""
    (photo,) = fn.LoadFacePhoto().load("examples/astronaut.png")
    (grace,) = fn.LoadFacePhoto().load("examples/grace_hopper.jpg")
    (deca,) = fn.LoadDECA().load(DECA_FILE, "auto")
    detect = fn.DetectAlignFace()
    aligned, alignment, count = detect.align(photo, "largest", 0, "hog", 256)
    grace_aligned, grace_alignment, _ = detect.align(grace, "largest", 0, "hog", 256)
    (rig,) = fn.DECAFit().fit(deca, aligned, alignment)
    (grace_rig,) = fn.DECAFit().fit(deca, grace_aligned, grace_alignment)
    (dr,) = mn.LoadDiffusionRigModel().load(DR_FILE, "fp32")
    return SimpleNamespace(photo=photo, grace=grace, deca=deca, aligned=aligned, alignment=alignment, count=count,
                           grace_aligned=grace_aligned, rig=rig, grace_rig=grace_rig, dr=dr)


def test_load_face_photo_gives_an_rgb_image_batch(pipe):
    assert pipe.photo.shape == (1, 512, 512, 3) and pipe.photo.dtype == torch.float32
    assert pipe.grace.shape == (1, 600, 512, 3)  # height 600, width 512 (IMAGE is [B, H, W, C])
    assert 0 <= float(pipe.photo.min()) and float(pipe.photo.max()) <= 1 and float(pipe.photo.std()) > 0.1
    (grey,) = fn.LoadFacePhoto().load("examples/cameraman.png")  # a greyscale file comes back as RGB
    assert grey.shape == (1, 512, 512, 3) and torch.equal(grey[..., 0], grey[..., 1])
    exact = np.asarray(Image.open(host.EXAMPLE_IMAGES / "astronaut.png").convert("RGB"), np.float32) / 255
    assert torch.equal(pipe.photo[0], torch.from_numpy(exact))
    with pytest.raises(FileNotFoundError, match="Load Face Photo: photo 'nope.png' not found"):
        fn.LoadFacePhoto().load("nope.png")


def test_detect_and_align_largest_index_and_all_on_a_photo_with_two_faces(pipe):
    assert pipe.aligned.shape == (1, 256, 256, 3) and pipe.count == 1 and pipe.alignment.sources == [0]
    two = two_face_photo()
    detect = fn.DetectAlignFace()
    every, every_alignment, count = detect.align(two, "all", 0, "hog", 256)
    assert count == 2 and every.shape == (2, 256, 256, 3) and every_alignment.sources == [0, 0]
    boxes = [f.face.box for f in every_alignment.faces]
    widths = [b[2] - b[0] for b in boxes]
    assert widths[0] > 1.5 * widths[1]  # largest first
    assert boxes[0][0] > 280 and boxes[1][2] < 250  # Grace Hopper on the right, the astronaut on the left
    largest, largest_alignment, n_largest = detect.align(two, "largest", 0, "hog", 256)
    assert n_largest == 1 and torch.equal(largest[0], every[0])
    second, second_alignment, n_second = detect.align(two, "index", 1, "hog", 256)
    assert n_second == 1 and torch.equal(second[0], every[1])
    assert second_alignment.faces[0].face.box == boxes[1]
    with pytest.raises(ValueError, match=r"Detect & Align Face, photo 1 of 1: face index 2 .* only 2 face\(s\)"):
        detect.align(two, "index", 2, "hog", 256)
    small, _, _ = detect.align(two, "largest", 0, "hog", 128)  # the size input sets the output size
    assert small.shape == (1, 128, 128, 3)


def test_a_photo_without_a_face_is_a_clear_error(pipe):
    grey = torch.full((1, 256, 256, 3), 0.5)
    with pytest.raises(ValueError) as err:
        fn.DetectAlignFace().align(grey, "largest", 0, "hog", 256)
    message = str(err.value)
    assert message.startswith("Detect & Align Face, photo 1 of 1: no face found")
    assert "try detector='cnn'" in message and "clearly visible" in message
    # in a batch the message says which photo had no face
    batch = torch.cat([pipe.photo, torch.full_like(pipe.photo, 0.5)])
    with pytest.raises(ValueError, match="Detect & Align Face, photo 2 of 2: no face found"):
        fn.DetectAlignFace().align(batch, "all", 0, "hog", 256)
    with pytest.raises(ValueError, match="DECA Fit: no face found in aligned image 1; connect the alignment output"):
        fn.DECAFit().fit(pipe.deca, grey)


def test_deca_fit_gives_finite_codes_of_the_right_shapes(pipe):
    rig = pipe.rig
    assert len(rig) == 1 and rig.image_size == (256, 256)
    shapes = {k: tuple(v.shape) for k, v in rig.codes.items()}
    assert shapes == {"shape": (1, 100), "tex": (1, 50), "exp": (1, 50), "pose": (1, 6), "cam": (1, 3),
                      "light": (1, 9, 3)}
    assert all(v.dtype == torch.float32 and bool(torch.isfinite(v).all()) for v in rig.codes.values())
    assert rig.tform.shape == (1, 3, 3) and rig.ffhq_center.shape == (1, 3)
    # without the alignment, the landmarks are detected again on the aligned face: nearly the same fit
    (again,) = fn.DECAFit().fit(pipe.deca, pipe.aligned)
    for key in rig.codes:
        torch.testing.assert_close(again.codes[key], rig.codes[key], atol=0.01, rtol=0)
    assert not torch.allclose(pipe.grace_rig.codes["shape"], rig.codes["shape"])  # another face, another fit


def test_relight_changes_the_shaded_render_but_not_normals_or_albedo(pipe):
    relight, render = fn.Relight(), fn.RenderBuffers()
    base = render.render(pipe.deca, pipe.rig)["result"][0]
    covered = (base != 0).any(1)[0]
    assert 0.2 < float(covered.float().mean()) < 0.8  # the face covers part of the aligned image
    from_right, sphere_right = relight.relight(pipe.rig, "sliders", 60.0, 0.0, 0.8, 0.3, WHITE)
    from_left, sphere_left = relight.relight(pipe.rig, "sliders", -60.0, 0.0, 0.8, 0.3, WHITE)
    for rig, sphere in ((from_right, sphere_right), (from_left, sphere_left)):
        assert sphere.shape == (1, 256, 256, 3) and sphere.dtype == torch.float32
        assert float(sphere.min()) == 0.0 and 0.5 < float(sphere.max()) <= 1.0
        assert torch.equal(sphere[0, 0, 0], torch.zeros(3))  # outside the sphere is black
        assert all(torch.equal(rig.codes[k], pipe.rig.codes[k]) for k in rig.codes if k != "light")
        assert rig.codes["light"].shape == (1, 9, 3)
    # the lit sphere is lit from the side the light comes from (positive azimuth = from image right)
    left, right = sphere_right[0, 128, 40].mean(), sphere_right[0, 128, 215].mean()
    assert right > left + 0.2
    assert sphere_left[0, 128, 40].mean() > sphere_left[0, 128, 215].mean() + 0.2
    # so is the rendered face, and only its shading changes
    right_buffers = render.render(pipe.deca, from_right)["result"][0]
    left_buffers = render.render(pipe.deca, from_left)["result"][0]
    for buffers in (right_buffers, left_buffers):
        assert (buffers[:, 0:3] - base[:, 0:3]).abs().max() > 0.05
        assert torch.equal(buffers[:, 3:9], base[:, 3:9])  # normals and albedo
    lit_left, lit_right = _halves(right_buffers[0, 0:3], covered)
    assert lit_right > lit_left + 0.05
    lit_left, lit_right = _halves(left_buffers[0, 0:3], covered)
    assert lit_left > lit_right + 0.05
    # a coloured light tints the sphere
    _, red = relight.relight(pipe.rig, "sliders", 0.0, 0.0, 0.8, 0.5, "#FF0000")
    assert float(red[..., 0].max()) > 0.5 and float(red[..., 1:].max()) == 0.0
    # rotate fitted light: no turn keeps the light, a turn changes it
    same, _ = relight.relight(pipe.rig, "rotate fitted light", 0.0, 0.0, 0.8, 0.5, WHITE)
    torch.testing.assert_close(same.codes["light"], pipe.rig.codes["light"], atol=1e-5, rtol=0)
    turned, _ = relight.relight(pipe.rig, "rotate fitted light", 90.0, 0.0, 0.8, 0.5, WHITE)
    assert not torch.allclose(turned.codes["light"], pipe.rig.codes["light"], atol=1e-3)
    torch.testing.assert_close(turned.codes["light"][:, 0], pipe.rig.codes["light"][:, 0])  # ambient band kept
    # copy reference: exactly the reference's light, nothing else
    copied, sphere = relight.relight(pipe.rig, "copy reference", 0.0, 0.0, 0.8, 0.5, WHITE, reference=pipe.grace_rig)
    assert torch.equal(copied.codes["light"], pipe.grace_rig.codes["light"])
    assert torch.equal(copied.codes["shape"], pipe.rig.codes["shape"])
    torch.testing.assert_close(sphere, fn._sphere_image(pipe.grace_rig.codes["light"]))


def test_relight_presets_set_the_named_light_whatever_the_sliders(pipe):
    from comfy_diffusionrig.face.lighting import preset_light

    relight, render = fn.Relight(), fn.RenderBuffers()
    split, sphere = relight.relight(pipe.rig, "preset", -90.0, -40.0, 0.1, 2.0, "#00FF00", preset="split")
    torch.testing.assert_close(split.codes["light"], preset_light("split")[None])
    assert sphere[0, 128, 215].mean() > sphere[0, 128, 40].mean() + 0.2  # key light on image right
    mirrored, _ = relight.relight(pipe.rig, "preset", 0.0, 0.0, 0.8, 0.5, WHITE, preset="split", mirror_preset=True)
    base = render.render(pipe.deca, pipe.rig)["result"][0]
    covered = (base != 0).any(1)[0]
    lit_left, lit_right = _halves(render.render(pipe.deca, split)["result"][0][0, 0:3], covered)
    assert lit_right > lit_left + 0.05
    lit_left, lit_right = _halves(render.render(pipe.deca, mirrored)["result"][0][0, 0:3], covered)
    assert lit_left > lit_right + 0.05
    with pytest.raises(ValueError, match="unknown light preset"):
        relight.relight(pipe.rig, "preset", 0.0, 0.0, 0.8, 0.5, WHITE, preset="disco")


def test_relight_bad_inputs_name_the_node(pipe):
    relight = fn.Relight()
    with pytest.raises(ValueError, match="Relight: mode 'copy reference' needs a reference rig"):
        relight.relight(pipe.rig, "copy reference", 0.0, 0.0, 0.8, 0.5, WHITE)
    with pytest.raises(ValueError, match="Relight: colour 'orange' is not a hex colour like #FFE0C0"):
        relight.relight(pipe.rig, "sliders", 0.0, 0.0, 0.8, 0.5, "orange")


def test_edit_expression_and_pose_sliders_and_copy(pipe):
    edit, rig = fn.EditExpressionPose(), pipe.rig
    (same,) = edit.edit(rig, 0.0, 0.0, 0.0, 0.0, 1.0)
    torch.testing.assert_close(same.codes["pose"], rig.codes["pose"], atol=1e-6, rtol=0)
    (jaw,) = edit.edit(rig, 20.0, 0.0, 0.0, 0.0, 1.0)
    assert float(jaw.codes["pose"][0, 3] - rig.codes["pose"][0, 3]) == pytest.approx(np.deg2rad(20), abs=0.01)
    torch.testing.assert_close(jaw.codes["pose"][:, :3], rig.codes["pose"][:, :3])  # head untouched
    (yaw,) = edit.edit(rig, 0.0, 30.0, 0.0, 0.0, 1.0)
    assert float(yaw.codes["pose"][0, 1] - rig.codes["pose"][0, 1]) == pytest.approx(np.deg2rad(30), abs=0.02)
    torch.testing.assert_close(yaw.codes["pose"][:, 3:], rig.codes["pose"][:, 3:])  # jaw untouched
    (neutral,) = edit.edit(rig, 0.0, 0.0, 0.0, 0.0, 0.0)
    assert torch.equal(neutral.codes["exp"], torch.zeros_like(rig.codes["exp"]))
    (double,) = edit.edit(rig, 0.0, 0.0, 0.0, 0.0, 2.0)
    torch.testing.assert_close(double.codes["exp"], 2 * rig.codes["exp"])
    for out in (jaw, yaw, neutral):
        assert all(torch.equal(out.codes[k], rig.codes[k]) for k in ("light", "shape", "tex", "cam"))
    # copy from a reference: expression and jaw by default, the head pose only when asked
    (copied,) = edit.edit(rig, 0.0, 0.0, 0.0, 0.0, 1.0, reference=pipe.grace_rig)
    assert torch.equal(copied.codes["exp"], pipe.grace_rig.codes["exp"])
    torch.testing.assert_close(copied.codes["pose"][:, 3:], pipe.grace_rig.codes["pose"][:, 3:], atol=1e-6, rtol=0)
    torch.testing.assert_close(copied.codes["pose"][:, :3], rig.codes["pose"][:, :3], atol=1e-6, rtol=0)
    (head,) = edit.edit(rig, 0.0, 0.0, 0.0, 0.0, 1.0, reference=pipe.grace_rig, copy_expression=False,
                        copy_jaw=False, copy_head_pose=True)
    assert torch.equal(head.codes["exp"], rig.codes["exp"])
    torch.testing.assert_close(head.codes["pose"][:, :3], pipe.grace_rig.codes["pose"][:, :3], atol=1e-6, rtol=0)
    # a turned head renders other normals
    base = fn.RenderBuffers().render(pipe.deca, rig)["result"][0]
    turned = fn.RenderBuffers().render(pipe.deca, yaw)["result"][0]
    assert (turned[:, 3:6] - base[:, 3:6]).abs().mean() > 0.02


def test_render_buffers_and_preview(pipe):
    buffers, preview = fn.RenderBuffers().render(pipe.deca, pipe.rig)["result"][:2]
    assert buffers.shape == (1, 9, 256, 256) and buffers.dtype == torch.float32
    assert bool(torch.isfinite(buffers).all())
    covered = (buffers != 0).any(1)
    normals = buffers[:, 3:6].permute(0, 2, 3, 1)[covered]
    length = normals.norm(dim=-1)  # unit normals (a little shorter where rasterization blends triangles)
    assert float(length.max()) <= 1.001 and float(length.median()) == pytest.approx(1.0, abs=0.01)
    assert float(normals[:, 2].mean()) > 0.5  # a face looking at the camera
    albedo = buffers[:, 6:9]
    assert 0 <= float(albedo.min()) and float(albedo.max()) <= 1
    assert preview.shape == (1, 256, 768, 3) and preview.dtype == torch.float32
    assert 0 <= float(preview.min()) and float(preview.max()) <= 1
    torch.testing.assert_close(preview[0, :, :256], buffers[0, 0:3].clamp(0, 1).permute(1, 2, 0))
    torch.testing.assert_close(preview[0, :, 512:], albedo[0].clamp(0, 1).permute(1, 2, 0))
    assert torch.equal(preview[0, :, 256:512][~covered[0]], torch.zeros(int((~covered[0]).sum()), 3))


def test_render_buffers_gives_each_buffer_and_the_coverage_as_images(pipe):
    node = fn.RenderBuffers()
    out = node.render(pipe.deca, pipe.rig)["result"]
    assert len(out) == len(node.RETURN_TYPES) == len(node.RETURN_NAMES) == len(node.OUTPUT_TOOLTIPS) == 6
    assert node.RETURN_TYPES[:2] == ("RIG_BUFFERS", "IMAGE")  # old links of saved workflows keep their slots
    buffers, preview, shaded, normal, albedo, mask = out
    for image in (shaded, normal, albedo):
        assert image.shape == (1, 256, 256, 3) and image.dtype == torch.float32
        assert 0 <= float(image.min()) and float(image.max()) <= 1
    torch.testing.assert_close(shaded[0], buffers[0, 0:3].clamp(0, 1).permute(1, 2, 0))
    torch.testing.assert_close(albedo[0], buffers[0, 6:9].clamp(0, 1).permute(1, 2, 0))
    torch.testing.assert_close(preview, torch.cat([shaded, normal, albedo], 2))
    # the mask is the renderer's coverage: binary, and the same whatever the light (a black light leaves
    # the shaded buffer all zero, the face is still there)
    assert mask.shape == (1, 256, 256) and set(mask.unique().tolist()) == {0.0, 1.0}
    dark = pipe.rig.with_light(torch.zeros(9, 3))
    dark_out = node.render(pipe.deca, dark)["result"]
    assert float(dark_out[0][:, 0:3].abs().max()) == 0 and torch.equal(dark_out[5], mask)
    inside = mask[0] > 0
    assert bool((buffers[0, 3:6].abs().sum(0)[~inside] == 0).all())
    assert float(inside.float().mean()) > 0.1
    # normal map convention, read off the rendered head: x image right -> R, y up -> G, z to the camera -> B
    columns = torch.nonzero(inside.any(0)).flatten()
    rows = torch.nonzero(inside.any(1)).flatten()
    left_edge, right_edge = int(columns.min()), int(columns.max())
    top_edge, bottom_edge = int(rows.min()), int(rows.max())
    third_w, third_h = (right_edge - left_edge) // 3, (bottom_edge - top_edge) // 3
    red, green, blue = normal[0, ..., 0], normal[0, ..., 1], normal[0, ..., 2]

    def mean_in(channel, area):
        return float(channel[area & inside].mean())

    left, right = torch.zeros_like(inside), torch.zeros_like(inside)
    left[:, left_edge:left_edge + third_w], right[:, right_edge - third_w:] = True, True
    top, bottom = torch.zeros_like(inside), torch.zeros_like(inside)
    top[top_edge:top_edge + third_h], bottom[bottom_edge - third_h:] = True, True
    assert mean_in(red, left) < 0.4 and mean_in(red, right) > 0.6  # the image-left side faces image left
    assert mean_in(green, top) > 0.55 and mean_in(green, bottom) < mean_in(green, top) - 0.1
    assert mean_in(blue, inside) > 0.75  # a face looking at the camera is lavender (B high)
    assert float(normal[0][~inside].abs().max()) == 0  # black outside the face
    # and it agrees with the lighting: a light from image right brightens the pixels with high R
    from_right = fn.Relight().relight(pipe.rig, "sliders", 90.0, 0.0, 1.0, 0.0, WHITE)[0]
    lit = node.render(pipe.deca, from_right)["result"][0][0, 0:3].mean(0)[inside]
    r = red[inside] - red[inside].mean()
    assert float((r * (lit - lit.mean())).mean()) > 0


def pipe_relit(pipe):
    return fn.Relight().relight(pipe.rig, "sliders", 60.0, 20.0, 0.9, 0.4, WHITE)


def test_encode_sample_paste_back_and_identity(pipe):
    encode, sampler, paste = mn.EncodeGlobalCode(), mn.DiffusionRigSampler(), fn.PasteFaceBack()
    (code,) = encode.encode(pipe.dr, pipe.aligned)
    (grace_code,) = encode.encode(pipe.dr, pipe.grace_aligned)
    assert code.shape == (1, 64) and code.dtype == torch.float32 and bool(torch.isfinite(code).all())
    assert not torch.allclose(code, grace_code)
    source = fn.RenderBuffers().render(pipe.deca, pipe.rig)["result"][0]
    lit, _ = pipe_relit(pipe)
    target = fn.RenderBuffers().render(pipe.deca, lit)["result"][0]
    (edited,) = sampler.sample(pipe.dr, target, code, 0, 2, 0.0, "inversion", 4, source_image=pipe.aligned,
                               source_buffers=source)
    assert edited.shape == (1, 256, 256, 3) and edited.dtype == torch.float32
    assert 0 <= float(edited.min()) and float(edited.max()) <= 1 and float(edited.std()) > 0.01
    with pytest.raises(ValueError, match=r"DiffusionRig Sampler: start = inversion needs inverted_start .*, or both source_image"):
        sampler.sample(pipe.dr, target, code, 0, 2, 0.0, "inversion", 4)

    image, mask, motion_mask = paste.paste(pipe.photo, pipe.alignment, edited, False, 0.08)
    assert not bool(motion_mask.any())  # no rigs connected: the photo's detail everywhere
    assert image.shape == pipe.photo.shape and image.dtype == torch.float32
    assert mask.shape == (1, 512, 512) and mask.dtype == torch.float32
    assert float(mask.min()) == 0.0 and float(mask.max()) == pytest.approx(1.0, abs=1e-6)
    x0, y0, x1, y1 = (int(v) for v in pipe.alignment.faces[0].face.box)
    assert float(mask[0, (y0 + y1) // 2, (x0 + x1) // 2]) == pytest.approx(1.0, abs=1e-6)  # face centre
    assert 0.01 < float((mask > 0).float().mean()) < 0.2  # the face, not the photo
    outside = mask[0] == 0
    assert torch.equal(image[0][outside], pipe.photo[0][outside])  # untouched, bit for bit
    assert (image[0][~outside] - pipe.photo[0][~outside]).abs().max() > 0.1
    # a wider feather blends less of the edit everywhere; colour matching keeps the outside untouched too
    soft_image, soft, _ = paste.paste(pipe.photo, pipe.alignment, edited, True, 0.3)
    assert bool((soft <= mask + 1e-6).all()) and float(soft.sum()) < 0.9 * float(mask.sum())
    assert torch.equal(soft_image[0][soft[0] == 0], pipe.photo[0][soft[0] == 0])
    assert not torch.equal(soft_image, image)

    identity = fn.FaceIdentitySimilarity()
    same = identity.compare(pipe.aligned, pipe.aligned, "auto")
    assert same["result"][0] == pytest.approx(1.0, abs=1e-4) and "same person" in same["result"][1]
    assert same["ui"]["text"] == [same["result"][1]]
    other = identity.compare(pipe.aligned, pipe.grace_aligned, "auto")
    assert other["result"][0] < 0.9 and "different people" in other["result"][1]
    # the random-weight model's output has no face: an answer (score -1), not a failure
    lost = identity.compare(pipe.aligned, torch.cat([pipe.aligned, edited]), "auto")
    assert lost["result"][0] == fn.NO_FACE_SCORE
    assert lost["result"][1].startswith("pair 1: same person") and "pair 2: no face found" in lost["result"][1]
    with pytest.raises(ValueError, match="Face Identity Similarity: 2 images against 3"):
        identity.compare(torch.cat([pipe.aligned] * 2), torch.cat([pipe.aligned] * 3), "auto")


def test_paste_back_every_face_of_a_photo_and_frames_of_one_face(pipe):
    two = two_face_photo()
    faces, alignment, _ = fn.DetectAlignFace().align(two, "all", 0, "hog", 256)
    paste = fn.PasteFaceBack()
    inverted = 1 - faces  # stand-in edits: every face pixel changes
    image, mask, edit_mask = paste.paste(two, alignment, inverted, False, 0.08, "edit")
    assert torch.equal(edit_mask, mask)  # the edit's own pixels wherever it was blended in
    assert image.shape == two.shape and mask.shape == (1, 330, 560)
    outside = mask[0] == 0
    assert torch.equal(image[0][outside], two[0][outside])
    for face in alignment.faces:  # both faces were pasted
        x0, y0, x1, y1 = (int(v) for v in face.face.box)
        centre = ((y0 + y1) // 2, (x0 + x1) // 2)
        assert float(mask[0][centre]) > 0.99
        torch.testing.assert_close(image[0][centre], 1 - two[0][centre], atol=0.05, rtol=0)
    # one face, several frames: one photo per frame
    frames = torch.stack([faces[0] * s for s in (0.2, 0.5, 0.8)])
    largest, largest_alignment, _ = fn.DetectAlignFace().align(two, "largest", 0, "hog", 256)
    images, masks, _ = paste.paste(two, largest_alignment, frames, False, 0.08)
    assert images.shape == (3, 330, 560, 3) and masks.shape == (3, 330, 560)
    assert torch.equal(masks[0], masks[2])
    means = [float(im[masks[0] > 0.99].mean()) for im in images]
    assert means[0] < means[1] < means[2]  # each photo holds its own frame
    with pytest.raises(ValueError, match=r"Paste Face Back: 3 edited image\(s\) for 2 aligned face\(s\)"):
        paste.paste(two, alignment, frames, False, 0.08)
    with pytest.raises(ValueError, match=r"Paste Face Back \(original\): the IMAGE batch is empty"):
        paste.paste(two[:0], alignment, inverted, False, 0.08)
    pair, pair_alignment, _ = fn.DetectAlignFace().align(torch.cat([two, two]), "largest", 0, "hog", 256)
    with pytest.raises(ValueError, match="Paste Face Back: the alignment came from 2 photos but 1 original"):
        paste.paste(two, pair_alignment, pair, False, 0.08)


def test_rig_sweep_frames_change_monotonically_and_share_the_noise(pipe):
    rig_sweep, render = fn.RigSweep(), fn.RenderBuffers()
    (jaw,) = rig_sweep.sweep(pipe.rig, "jaw_open", 0.0, 30.0, 5, True, 0)
    assert len(jaw) == 5
    opened = jaw.codes["pose"][:, 3] - pipe.rig.codes["pose"][0, 3]
    expected = torch.deg2rad(torch.as_tensor(sweep_values(0.0, 30.0, 5, ease=True), dtype=torch.float32))
    torch.testing.assert_close(opened, expected, atol=0.01, rtol=0)
    assert bool((opened.diff() > 0).all())
    assert all(torch.equal(jaw.codes[k], pipe.rig.codes[k].expand_as(jaw.codes[k])) for k in ("shape", "light"))
    # a light swept from image left to image right: the right half of the face brightens frame by frame
    frontal, _ = fn.Relight().relight(pipe.rig, "sliders", 0.0, 0.0, 0.9, 0.3, WHITE)
    (light,) = rig_sweep.sweep(frontal, "light_azimuth", -60.0, 60.0, 4, False, 0)
    buffers, preview = render.render(pipe.deca, light)["result"][:2]
    assert buffers.shape == (4, 9, 256, 256) and preview.shape == (4, 256, 768, 3)
    covered = (buffers[0] != 0).any(0)
    balance = [(lambda lr: lr[1] - lr[0])(_halves(b[0:3], covered)) for b in buffers]
    assert all(b < a for a, b in zip(balance[1:], balance[:-1])), balance
    assert balance[0] < -0.05 < 0.05 < balance[-1]
    assert torch.equal(buffers[:, 3:9], buffers[:1, 3:9].expand(4, -1, -1, -1))  # only the light moved
    # every frame starts from the same noise: a frame sampled alone is the frame sampled in the batch
    (code,) = mn.EncodeGlobalCode().encode(pipe.dr, pipe.aligned)
    sampler = mn.DiffusionRigSampler()
    (frames,) = sampler.sample(pipe.dr, buffers[[0, 3]], code, 7, 2, 0.0, "noise", 2)
    (alone,) = sampler.sample(pipe.dr, buffers[3:], code, 7, 2, 0.0, "noise", 1)
    assert frames.shape == (2, 256, 256, 3)
    torch.testing.assert_close(frames[1:], alone, atol=1e-4, rtol=0)
    assert (frames[0] - frames[1]).abs().mean() > 1e-3  # and the light change shows
    # face_index picks the face of a multi-face rig
    both = type(pipe.rig).cat([pipe.rig, pipe.grace_rig])
    (picked,) = rig_sweep.sweep(both, "expression_strength", 0.0, 1.0, 3, False, 1)
    torch.testing.assert_close(picked.codes["exp"][-1], pipe.grace_rig.codes["exp"][0])
    assert torch.equal(picked.codes["exp"][0], torch.zeros(50))
    with pytest.raises(ValueError, match=r"Rig Sweep: face_index 2 but the rig has 2 face\(s\)"):
        rig_sweep.sweep(both, "jaw_open", 0.0, 1.0, 3, False, 2)


def test_group_photo_each_face_is_edited_as_it_would_be_alone(pipe):
    """faces = all, start = inversion: every face starts from its own inversion (the old node used the first's)."""
    two = two_face_photo()
    aligned, alignment, count = fn.DetectAlignFace().align(two, "all", 0, "hog", 256)
    assert count == 2
    (rig,) = fn.DECAFit().fit(pipe.deca, aligned, alignment)
    lit = fn.Relight().relight(rig, "sliders", 60.0, 20.0, 0.9, 0.4, WHITE)[0]
    source = fn.RenderBuffers().render(pipe.deca, rig)["result"][0]
    target = fn.RenderBuffers().render(pipe.deca, lit)["result"][0]
    (code,) = mn.EncodeGlobalCode().encode(pipe.dr, aligned)
    sampler = mn.DiffusionRigSampler()
    (both,) = sampler.sample(pipe.dr, target, code, 0, 2, 0.0, "inversion", 4, source_image=aligned,
                             source_buffers=source)
    assert both.shape == (2, 256, 256, 3)
    for i in range(2):
        (alone,) = sampler.sample(pipe.dr, target[i:i + 1], code[i:i + 1], 0, 2, 0.0, "inversion", 1,
                                  source_image=aligned[i:i + 1], source_buffers=source[i:i + 1])
        # batched vs alone: float32 round-off, amplified by the inversion to ~3e-3 at a few dozen of 196608 values
        # (about one 8-bit level), and far below that on average
        torch.testing.assert_close(both[i:i + 1], alone, atol=6e-3, rtol=0)
        assert float((both[i:i + 1] - alone).abs().mean()) < 1e-4
    assert (both[0] - both[1]).abs().mean() > 0.02
    with pytest.raises(ValueError, match="DiffusionRig Sampler: 2 source image\\(s\\) but 1 source buffer"):
        sampler.sample(pipe.dr, target, code, 0, 2, 0.0, "inversion", 4, source_image=aligned,
                       source_buffers=source[:1])
    with pytest.raises(ValueError, match="DiffusionRig Sampler: 3 buffers, 2 global code"):
        sampler.sample(pipe.dr, torch.cat([target, target[:1]]), code, 0, 2, 0.0, "inversion", 4,
                       source_image=aligned, source_buffers=source)


def test_the_sampler_uses_each_of_its_settings(pipe):
    """Changing seed, steps, eta or start changes the picture (and the same settings repeat it exactly)."""
    (code,) = mn.EncodeGlobalCode().encode(pipe.dr, pipe.aligned)
    source = fn.RenderBuffers().render(pipe.deca, pipe.rig)["result"][0]
    sampler = mn.DiffusionRigSampler()

    def run(seed=1, steps=2, eta=0.0, start="noise"):
        return sampler.sample(pipe.dr, source, code, seed, steps, eta, start, 4, source_image=pipe.aligned,
                              source_buffers=source)[0]

    base = run()
    assert torch.equal(base, run())
    for change in (dict(seed=2), dict(steps=3), dict(start="inversion")):
        assert (run(**change) - base).abs().max() > 0.05, change  # (the random model saturates most pixels)
    # eta's noise enters before the last step (with 2 steps only the step to t = 0 gets any, ~1e-2 of it)
    assert (run(steps=5, eta=1.0) - run(steps=5)).abs().max() > 0.05
    for bad, message in ((dict(steps=0), "steps must be"), (dict(eta=float("nan")), "eta must be")):
        with pytest.raises(ValueError, match=f"DiffusionRig Sampler: {message}"):
            run(**bad)


def test_paste_face_back_takes_the_edited_face_at_any_size(pipe):
    """An upscaler's 4x output lands where the 256 px face does: both pastes agree within resampling."""
    big = torch.nn.functional.interpolate(pipe.aligned.permute(0, 3, 1, 2), scale_factor=4, mode="bicubic",
                                          align_corners=False).clamp(0, 1).permute(0, 2, 3, 1)
    node = fn.PasteFaceBack()
    small_out, small_mask, _ = node.paste(pipe.photo, pipe.alignment, pipe.aligned, False, 0.08, "edit")
    big_out, big_mask, _ = node.paste(pipe.photo, pipe.alignment, big, False, 0.08, "edit")
    assert big_out.shape == small_out.shape == pipe.photo.shape
    assert torch.allclose(big_mask, small_mask, atol=1 / 255)
    inside = small_mask[0] > 0.5
    diff = (big_out[0] - small_out[0]).abs()[inside]
    assert float(diff.mean()) < 2 / 255 and float(diff.quantile(0.99)) < 12 / 255
    shifted = torch.roll(big, shifts=8, dims=2)  # a 2 px (256 px scale) offset would show
    moved, _, _ = node.paste(pipe.photo, pipe.alignment, shifted, False, 0.08, "edit")
    assert float((moved[0] - small_out[0]).abs()[inside].mean()) > 2 * float(diff.mean())


def test_paste_face_back_moves_the_photos_detail_with_the_rig(pipe):
    """With deca, rig and edited_rig the photo's detail follows the rig's motion (the library's rig_motion and
    paste_faces, nothing of its own); motion_mask marks where the edit's own pixels were used instead, inside the
    blend only. A relit rig did not move: exactly the paste without rigs. Missing or mismatched rigs: one line."""
    from comfy_diffusionrig.face.motion import rig_motion
    from comfy_diffusionrig.photo.paste import paste_faces

    node = fn.PasteFaceBack()
    (opened,) = fn.EditExpressionPose().edit(pipe.rig, 20.0, 15.0, 0.0, 0.0, 1.0)
    plain, mask, none = node.paste(pipe.photo, pipe.alignment, pipe.aligned, False, 0.08)
    assert torch.equal(plain, pipe.photo) and not bool(none.any())  # unedited, unmoved: the photo itself
    image, mask_moved, motion_mask = node.paste(pipe.photo, pipe.alignment, pipe.aligned, False, 0.08, "ratio", 2.0,
                                                pipe.deca, pipe.rig, opened)
    assert torch.equal(mask_moved, mask) and not torch.equal(image, pipe.photo)
    assert float(motion_mask.max()) > 0.5 and bool((motion_mask <= mask + 1e-6).all())
    assert not bool(motion_mask[mask == 0].any()) and float(motion_mask.sum()) < 0.5 * float(mask.sum())
    photo = host.image_to_pil(pipe.photo, "x")[0]
    face = host.image_to_pil(pipe.aligned, "x")[0]
    direct = paste_faces(photo, pipe.alignment.faces, [face], motion=pipe.deca.run(rig_motion, pipe.rig, opened))
    assert torch.equal(image, host.pil_to_image([direct.image]))
    (relit, _) = pipe_relit(pipe)
    same = node.paste(pipe.photo, pipe.alignment, pipe.aligned, False, 0.08, "ratio", 2.0, pipe.deca, pipe.rig, relit)
    assert torch.equal(same[0], plain) and not bool(same[2].any())
    whole = node.paste(pipe.photo, pipe.alignment, pipe.aligned, False, 0.08, "edit", 2.0, pipe.deca, pipe.rig, opened)
    assert torch.equal(whole[2], whole[1])
    with pytest.raises(ValueError, match="^Paste Face Back: the face's motion needs deca, rig and edited_rig together; "
                                         "connect edited_rig too"):
        node.paste(pipe.photo, pipe.alignment, pipe.aligned, False, 0.08, "ratio", 2.0, pipe.deca, pipe.rig)
    with pytest.raises(ValueError, match="^Paste Face Back: rig has 1 face\\(s\\) for 1 aligned face\\(s\\) and "
                                         "edited_rig 2 row\\(s\\) for 1 edited image"):
        node.paste(pipe.photo, pipe.alignment, pipe.aligned, False, 0.08, "ratio", 2.0, pipe.deca, pipe.rig,
                   opened.expand(2))
    with pytest.raises(ValueError, match="^Paste Face Back: detail_radius must be a number of pixels >= 0"):
        node.paste(pipe.photo, pipe.alignment, pipe.aligned, False, 0.08, "ratio", -1.0)


def test_bad_images_get_one_clear_line_naming_the_node(pipe):
    """An empty batch, 2 or 5 channels, another rank or NaN pixels: the node says which input and what to do."""
    paste, detect = fn.PasteFaceBack(), fn.DetectAlignFace()
    cases = [(torch.zeros(0, 64, 64, 3), "the IMAGE batch is empty"),
             (torch.zeros(1, 64, 64, 2), "expected 1 \\(grey\\), 3 \\(RGB\\) or 4 \\(RGBA\\) colour channels, got 2"),
             (torch.zeros(64, 64, 3), "expected an IMAGE batch \\[B, H, W, C\\]")]
    for image, message in cases:
        with pytest.raises(ValueError, match=f"^Detect & Align Face: {message}"):
            detect.align(image, "largest", 0, "hog", 256)
    nan_edit = pipe.aligned.clone()
    nan_edit[0, 100, 100, 0] = float("nan")  # a NaN edit is refused, not pasted back as a black face
    with pytest.raises(ValueError, match=r"^Paste Face Back \(edited\): the IMAGE holds NaN or infinite values"):
        paste.paste(pipe.photo, pipe.alignment, nan_edit, False, 0.08)
    grey = pipe.aligned.mean(-1, keepdim=True)  # grey and RGBA images are fine
    assert host.image_to_unit(grey, "x").shape == (1, 3, 256, 256)
    rgba = torch.cat([pipe.aligned, torch.ones_like(pipe.aligned[..., :1])], -1)
    assert torch.equal(host.image_to_unit(rgba, "x"), host.image_to_unit(pipe.aligned, "x"))
