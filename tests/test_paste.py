"""Paste back with the photo's own detail (ratio / difference of smoothed images), its radius, and the rig's
motion, on a known answer: the demo's synthetic person photographed at 384 px with fine skin detail under a
light A, and the truth under a light B (and with the jaw opened, a new expression and the head turned).
The "edit" is the truth itself, aligned like the photo at 64 px: what a flawless 64 px model would give, so
every difference from the truth is paste back's own. No face detection: the landmarks are the true ones.
Also real photos enlarged to 1-12 megapixels (example_images/, detected with dlib): an unedited face
comes back as the photo, and pixels outside the mask are never touched."""

from __future__ import annotations

import math
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

# the benchmark's scene and scores, so the test and the README's table measure the same thing
import bench_detail as bench  # noqa: E402
from comfy_diffusionrig import paste_back  # noqa: E402
from comfy_diffusionrig.face.deca import load_deca  # noqa: E402
from comfy_diffusionrig.face.motion import rig_motion  # noqa: E402
from comfy_diffusionrig.face.rig import render_layers  # noqa: E402
from comfy_diffusionrig.photo.alignment import align_face  # noqa: E402
from comfy_diffusionrig.photo.detection import Face, detect_faces  # noqa: E402
from comfy_diffusionrig.photo.paste import FaceMotion, paste_faces  # noqa: E402

PHOTO, ALIGNED = 384, 64
EXAMPLES = Path(__file__).resolve().parents[1] / "example_images"


@pytest.fixture(scope="module")
def scene(demo_models):
    deca = load_deca(demo_models / "deca" / "deca_model.tar", demo_models / "flame")
    world = bench.World(demo_models / "flame", 32, seed=0)
    person, view = world.subjects(1)[0], world.views(1)[0]
    detail = bench.fine_detail(person, seed=0)
    cam = view["cam"].clone()[None]
    cam[:, 0] /= 1.5  # the face fills about a third of the photo
    light_a, light_b = (bench.sh_from_direction(**v).float()[None] for v in bench.LIGHTS[0])
    codes = {"shape": person["shape"][None], "tex": person["tex"][None], "exp": view["exp"][None],
             "pose": view["pose"][None], "cam": cam, "light": light_a}
    with torch.no_grad():
        center = deca.decode(codes)["center"]
    shoot = lambda c: bench.photograph(world, deca, person, detail, c, center, PHOTO)  # noqa: E731
    photo = shoot(codes)
    landmarks = bench.landmarks_px(deca, codes, PHOTO)
    face = bench.align(photo, landmarks, ALIGNED)
    rig = bench.aligned_rig(codes, center, face, PHOTO, bench.head_id(deca.flame))
    relit = {**codes, "light": light_b}
    posed = {**bench.pose_edit(codes, 0), "light": light_b}
    truths = {"light": shoot(relit), "pose": shoot(posed)}
    edits = {k: bench.align(v, landmarks, ALIGNED).image for k, v in truths.items()}
    inner = paste_faces(photo, face, face.image, detail="edit").mask > 0.5
    ys, xs = np.nonzero(inner)
    box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    return SimpleNamespace(deca=deca, photo=photo, face=face, rig=rig, posed_rig=replace(rig, codes=posed),
                           truths=truths, edits=edits, inner=inner, box=box, landmarks=landmarks)


def score(scene, image, truth):
    return bench.scores(image, scene.truths[truth], scene.box, scene.inner, 1.5 * PHOTO / 512)


def test_unedited_face_comes_back_exactly_with_the_photos_detail(scene):
    """edited = aligned: the ratio is exactly 1 and the difference exactly 0, so the photo comes back bit for bit
    (the plain paste resamples the 64 px face and loses the photo's fine detail)."""
    photo = np.asarray(scene.photo)
    for detail in ("ratio", "difference"):
        assert np.array_equal(np.asarray(paste_back(scene.photo, scene.face, scene.face.image, detail=detail)), photo)
    plain = paste_back(scene.photo, scene.face, scene.face.image, detail="edit")
    assert not np.array_equal(np.asarray(plain), photo)


def _enlarged_photo(name: str, megapixels: float) -> tuple[Image.Image, Face]:
    """An example photo enlarged (LANCZOS) to about `megapixels`, and its largest face: detected by dlib on the
    photo as shipped (quick), the landmarks then scaled with the pixel grid (pixel centres at integers)."""
    small = Image.open(EXAMPLES / name).convert("RGB")
    k = math.sqrt(megapixels * 1e6 / (small.width * small.height))
    photo = small.resize((round(small.width * k), round(small.height * k)), Image.LANCZOS)
    scale = np.array([photo.width / small.width, photo.height / small.height])
    face = detect_faces(small)[0]
    landmarks = (face.landmarks + 0.5) * scale - 0.5
    box = tuple(np.concatenate([np.array(face.box[:2]) * scale, np.array(face.box[2:]) * scale]))
    return photo, Face(box, landmarks, face.score, face.detector)


def _box_psnr(image: Image.Image, photo: Image.Image, mask: np.ndarray) -> float:
    """PSNR (dB, 8 bit) of image against photo in the bounding box of the pasted mask (inf when equal)."""
    ys, xs = np.nonzero(mask > 0)
    box = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
    mse = ((np.asarray(image, np.float64)[box] - np.asarray(photo, np.float64)[box]) ** 2).mean()
    return math.inf if mse == 0 else 10 * math.log10(255 ** 2 / mse)


@pytest.mark.parametrize("name, megapixels", [("astronaut.png", 1.05), ("grace_hopper.jpg", 3.5),
                                               ("grace_hopper.jpg", 12.0)], ids=["1MP", "3.5MP", "12MP"])
def test_real_photos_unedited_face_is_the_photo_and_nothing_outside_the_mask_moves(name, megapixels):
    """A real photo of 1-12 MP, its face aligned at 256 px: pasted back unedited (edited = aligned) with the
    photo's detail (the default), the face box scores at least 45 dB against the photo (here it is the photo);
    the plain paste of the 256 px face does not reach that (measured 42.8 dB at 1 MP, 32.6 at 12 MP, where the
    face is 1100 px across). An edit that changes the face (darker, a left-right ramp) changes pixels inside
    the mask only: every pixel where the mask is 0 keeps its exact bytes."""
    photo, detected = _enlarged_photo(name, megapixels)
    assert 1.0 <= photo.width * photo.height / 1e6 <= 12.01
    face = align_face(photo, detected, 256)
    unedited = paste_faces(photo, face, face.image)
    assert _box_psnr(unedited.image, photo, unedited.mask) >= 45.0
    aligned = np.asarray(face.image, np.float32)
    ramp = np.linspace(0.55, 0.9, face.size, dtype=np.float32)[None, :, None]
    edited = Image.fromarray(np.uint8(np.rint(aligned * ramp)))
    changed = paste_faces(photo, face, edited)
    before, after = np.asarray(photo), np.asarray(changed.image)
    outside = changed.mask == 0
    assert outside.mean() > 0.8 and np.array_equal(after[outside], before[outside])
    assert (after[changed.mask > 0.5] != before[changed.mask > 0.5]).any(axis=1).mean() > 0.9
    if megapixels >= 12:
        plain = paste_faces(photo, face, face.image, detail="edit")
        assert _box_psnr(plain.image, photo, plain.mask) < 40.0


def test_the_photos_detail_under_the_edits_light(scene):
    """A light edit: the photo's detail relit by the ratio of the smoothed images beats the plain paste of the
    64 px face (measured 27.6 against 25.5 dB in the face, the truth's fine-detail energy kept: 1.00 against
    0.06), and the ratio scales the detail with the light where the difference only shifts it (detail SNR 5.3
    against 3.7 dB)."""
    plain = score(scene, paste_back(scene.photo, scene.face, scene.edits["light"], detail="edit"), "light")
    ratio = score(scene, paste_back(scene.photo, scene.face, scene.edits["light"], detail="ratio",
                                    detail_radius=0.0), "light")
    difference = score(scene, paste_back(scene.photo, scene.face, scene.edits["light"], detail="difference",
                                         detail_radius=0.0), "light")
    assert ratio["face psnr"] > plain["face psnr"] + 1.5
    assert 0.85 < ratio["hf"] < 1.15 and plain["hf"] < 0.2
    assert ratio["detail snr"] > difference["detail snr"] + 1.0
    assert difference["face psnr"] > plain["face psnr"] + 1.5


def _photo_to_aligned(face, shape):
    ys, xs = np.mgrid[:shape[0], :shape[1]]
    pts = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.float64)
    return (pts @ face.transform[:2, :2].T + face.transform[:2, 2]).reshape(*shape, 2)


def test_ratio_multiplies_the_detail_and_difference_adds_to_it(scene):
    """Closed form: an edit that is the aligned face at 0.6 x its brightness gives, inside the face, the photo
    at 0.6 x with its fine detail at 0.6 x (ratio) or the photo darkened with its detail unchanged (difference)."""
    dark = Image.fromarray(np.uint8(np.rint(np.asarray(scene.face.image, np.float64) * 0.6)))
    photo = np.asarray(scene.photo, np.float64)
    core = paste_faces(scene.photo, scene.face, dark, detail="edit").mask > 0.999
    core &= photo.mean(-1) > 60  # the floor of the ratio (4 of 255) is negligible there
    high = lambda x: (x - gaussian_filter(x, (1.5, 1.5, 0)))[core]  # noqa: E731
    spread = high(photo).std()
    got = {}
    for detail in ("ratio", "difference"):
        out = np.asarray(paste_back(scene.photo, scene.face, dark, detail=detail, detail_radius=1.0), np.float64)
        got[detail] = (np.median(out.mean(-1)[core] / photo.mean(-1)[core]), high(out).std() / spread)
    assert got["ratio"][0] == pytest.approx(0.61, abs=0.03) and got["ratio"][1] == pytest.approx(0.6, abs=0.04)
    assert got["difference"][0] == pytest.approx(0.61, abs=0.06) and got["difference"][1] == pytest.approx(1.0, abs=0.04)


@pytest.mark.parametrize("radius", [0.0, 2.0, 6.0])
def test_the_radius_is_a_gaussian_in_pixels_of_a_256_px_face(scene, radius):
    """An edit 40 levels darker on the left of the aligned face than on the right: across the step the photo
    changes as a Gaussian step of sigma = radius, measured in pixels of the face aligned at 256 (plus the
    64 -> 256 px resampling of the edit's own edge, sigma ~1.4 measured at radius 0)."""
    face = scene.face
    step = np.asarray(face.image, np.float64).copy()
    split = ALIGNED // 2
    step[:, :split] -= 40
    edit = Image.fromarray(np.uint8(np.clip(np.rint(step), 0, 255)))
    before = np.asarray(scene.photo, np.float64)
    after = np.asarray(paste_back(scene.photo, face, edit, detail="difference", detail_radius=radius), np.float64)
    core = paste_faces(scene.photo, face, edit, detail="edit").mask > 0.999
    unsteady = np.abs(step - np.asarray(face.image, np.float64)).max(-1) != 40  # clipped at 0: not a clean step
    u = _photo_to_aligned(face, core.shape)
    ok = core & ~unsteady[np.clip(np.rint(u[..., 1]).astype(int), 0, ALIGNED - 1),
                          np.clip(np.rint(u[..., 0]).astype(int), 0, ALIGNED - 1)]
    x256 = (u[..., 0][ok] + 0.5) * 256 / ALIGNED - 0.5  # aligned column in pixels of a 256 px face
    change = (after - before).mean(-1)[ok] / -40  # 1 on the left, 0 on the right
    edge = 256 / 2 - 0.5
    near = np.abs(x256 - edge) < 30
    best = min((float(((change[near] - 0.5 * (1 - _erf((x256[near] - edge) / (s * math.sqrt(2))))) ** 2).mean()), s)
               for s in np.arange(0.5, 12, 0.1))[1]
    expected = math.hypot(radius, 1.4)
    assert best == pytest.approx(expected, rel=0.15), (best, expected)


def _erf(x):
    return np.vectorize(math.erf)(x)


def test_rig_motion_of_a_still_face_and_of_a_known_shift(scene):
    """No geometry change: exactly nothing moved. The camera moved by 3 px (of the 256 grid) to image right:
    every trusted face pixel came from 3 px to its left (the flow's pixel-centre convention, checked against
    the rasteriser's own pixel positions)."""
    still = rig_motion(scene.deca, scene.rig, scene.rig.with_light(torch.zeros(9, 3)))[0]
    assert not still.moved and np.array_equal(still.flow, FaceMotion.still(256).flow)
    cam = scene.rig.codes["cam"].clone()
    # the crop's x in [-1, 1] spans 224 crop px; the rig draws crop px onto the aligned face through tform
    px_per_crop_unit = 112 * math.sqrt(abs(float(torch.linalg.det(scene.rig.tform[0, :2, :2])))) * 256 / ALIGNED
    cam[0, 1] += 3 / px_per_crop_unit / float(cam[0, 0])
    shifted = rig_motion(scene.deca, scene.rig, scene.rig.with_codes(cam=cam))[0]
    ys, xs = np.mgrid[:256, :256]
    dx, dy = shifted.flow[..., 0] - xs, shifted.flow[..., 1] - ys
    moved = (shifted.trust == 1) & (np.abs(dx) > 0.5)
    assert moved.sum() > 5000
    # all but a few silhouette pixels (where another triangle wins the depth tie) to within 0.02 px
    assert np.percentile(np.abs(dx[moved] + 3.0), 99) < 0.02 and np.percentile(np.abs(dy[moved]), 99) < 0.02


def test_rig_motion_trusts_what_was_seen_and_leaves_the_uncovered_to_the_edit(scene):
    """Jaw opened, head turned: background the head uncovered (drawn in the photo's render, not in the edit's)
    is untrusted; face points seen in both renders that barely moved are trusted."""
    motion = rig_motion(scene.deca, scene.rig, scene.posed_rig)[0]
    big = lambda rig: replace(rig, tform=rig.tform @ torch.diag(torch.tensor([4.0, 4.0, 1.0])),  # noqa: E731
                              image_size=(256, 256))
    before = render_layers(scene.deca, big(scene.rig))["alpha"][0, 0].numpy() > 0
    after = render_layers(scene.deca, big(scene.posed_rig))["alpha"][0, 0].numpy() > 0
    uncovered = before & ~after
    assert uncovered.sum() > 200 and motion.trust[uncovered].max() < 0.5
    ys, xs = np.mgrid[:256, :256]
    steady = after & before & (np.hypot(motion.flow[..., 0] - xs, motion.flow[..., 1] - ys) < 1.0)
    assert steady.sum() > 500 and (motion.trust[steady] == 1).mean() > 0.8


def _raster(deca, rig, size=256):
    """Which triangle the renderer draws at each pixel of a size x size grid over the aligned face (-1: none)."""
    tform = rig.tform @ torch.diag(torch.tensor([size / rig.image_size[0]] * 2 + [1.0]))
    with torch.no_grad():
        out = deca.decode(rig.codes, (size, size), tform, rig.ffhq_center)
    packed, n = out["pix_to_face"][0].numpy(), deca.renderer.faces.shape[0]
    return np.where(packed >= 0, packed % n, -1)


def test_skin_hidden_in_the_photo_is_left_to_the_edit(scene):
    """The head turned 35 degrees further: triangles that the photo's render never draws (hidden behind the
    face or the nose) but the edit's does are not trusted, checked by which triangles each render drew rather
    than by depths."""
    from comfy_diffusionrig.face.rig import edit_pose

    turned = edit_pose(scene.rig, yaw=35.0)
    motion = rig_motion(scene.deca, scene.rig, turned)[0]
    seen = set(np.unique(_raster(scene.deca, scene.rig)).tolist())
    drawn = _raster(scene.deca, turned)
    counts = np.bincount(drawn[drawn >= 0], minlength=scene.deca.renderer.faces.shape[0])
    hidden = (drawn >= 0) & ~np.isin(drawn, list(seen)) & (counts[np.maximum(drawn, 0)] >= 3)  # not slivers
    assert hidden.sum() > 100
    assert (motion.trust[hidden] < 0.5).mean() > 0.98


def test_skin_stretched_open_is_left_to_the_edit(scene):
    """The jaw opened 35 degrees: where the flow spreads a small patch of the photo over a large one (the mouth
    opening: the numeric Jacobian of the flow, by finite differences, below 0.3 of the area) it is not trusted."""
    from comfy_diffusionrig.face.rig import edit_pose

    opened = edit_pose(scene.rig, jaw_open=35.0)
    motion = rig_motion(scene.deca, scene.rig, opened)[0]
    fx, fy = motion.flow[..., 0].astype(np.float64), motion.flow[..., 1].astype(np.float64)
    gx_x, gx_y = np.gradient(fx, axis=1), np.gradient(fx, axis=0)
    gy_x, gy_y = np.gradient(fy, axis=1), np.gradient(fy, axis=0)
    area = gx_x * gy_y - gx_y * gy_x
    smooth = (np.abs(np.stack([gx_x, gx_y, gy_x, gy_y])) < 3).all(0)  # not across a silhouette
    drawn = _raster(scene.deca, opened) >= 0
    stretched = drawn & smooth & (np.abs(area) < 0.3)
    assert stretched.sum() > 300
    assert (motion.trust[stretched] < 0.5).mean() > 0.9


def test_the_photos_detail_moves_with_the_rig(scene):
    """Light, jaw, expression and head turn edited at once: without the motion the photo's detail sits where the
    face was and the transfer is worse than the plain paste; moved by the rig (the edit's own pixels where the
    motion is untrusted) it beats both (measured 25.2 dB in the face against 24.8 plain and 22.0 unmoved;
    fine-detail energy 0.56 against 0.06 plain). The edit mask is the untrusted part of the pasted region."""
    edit = scene.edits["pose"]
    motion = rig_motion(scene.deca, scene.rig, scene.posed_rig)
    plain = score(scene, paste_back(scene.photo, scene.face, edit, detail="edit"), "pose")
    unmoved = score(scene, paste_back(scene.photo, scene.face, edit, detail="ratio"), "pose")
    pasted = paste_faces(scene.photo, scene.face, edit, detail="ratio", motion=motion)
    moved = score(scene, pasted.image, "pose")
    assert moved["face psnr"] > unmoved["face psnr"] + 2.0
    assert moved["face psnr"] > plain["face psnr"] + 0.2
    assert moved["hf"] > plain["hf"] + 0.3
    assert bool((pasted.edit_mask <= pasted.mask + 1e-6).all()) and not pasted.edit_mask[pasted.mask == 0].any()
    assert 0.03 < float(pasted.edit_mask[scene.inner].mean()) < 0.4
    # with the edit's own pixels the whole blend is the edit's
    whole = paste_faces(scene.photo, scene.face, edit, detail="edit", motion=motion)
    np.testing.assert_array_equal(whole.edit_mask, whole.mask)


def test_detail_settings_are_checked(scene):
    for bad, message in ((dict(detail="sharp"), "unknown detail mode 'sharp'; choose one of ratio, difference, "
                                                "edit"),
                         (dict(detail_radius=-1.0), "detail_radius must be a number of pixels >= 0"),
                         (dict(detail_radius=float("nan")), "detail_radius must be")):
        with pytest.raises(ValueError, match=message):
            paste_back(scene.photo, scene.face, scene.face.image, **bad)
    with pytest.raises(ValueError, match="1 aligned face\\(s\\) but 2 motion"):
        paste_back(scene.photo, [scene.face], [scene.face.image], motion=[None, None])


def test_the_default_feather_is_the_paste_nodes_default(scene):
    """The CLI pastes with paste_back's default feather: 0.08 of the face width, the Paste Face Back node's default."""
    from nodes.face_nodes import PasteFaceBack

    assert PasteFaceBack.INPUT_TYPES()["required"]["feather"][1]["default"] == 0.08
    edit = scene.edits["light"]
    default = np.asarray(paste_back(scene.photo, scene.face, edit))
    assert np.array_equal(default, np.asarray(paste_back(scene.photo, scene.face, edit, feather=0.08)))
    assert not np.array_equal(default, np.asarray(paste_back(scene.photo, scene.face, edit, feather=0.16)))
