"""Physical buffers: parity with DECA's SRenderY / decode() renders in render.pt."""

from __future__ import annotations

import pytest
import torch

from comfy_diffusionrig.face.buffers import Renderer, project, transform_points, vertex_normals
from comfy_diffusionrig.face.flame_files import read_obj

from conftest import reference_file

CASES = ["direct_64", "direct_256", "orig_224_to_256", "orig_64_to_72x96"]
# ours -> fixture key
IMAGES = {"rendered": "images", "normal": "normal_images", "albedo": "albedo_images", "alpha": "alpha_images"}


@pytest.fixture(scope="module")
def fixture():
    faces, uvcoords, uvfaces = read_obj(reference_file("flame", "head_template_synthetic.obj"))
    cases = torch.load(reference_file("flame", "render.pt"), weights_only=True)
    albedo = torch.load(reference_file("flame", "flametex.pt"), weights_only=True)["albedo"]
    renderer = Renderer(faces, uvcoords, uvfaces, backend="torch")
    return renderer, cases, albedo


def _render(renderer, case, albedo):
    height, width = case["images"].shape[2:]
    inputs = dict(
        verts=case["verts"],
        trans_verts=case["trans_verts"],
        albedo=albedo[case["albedo_rows"]],
        light=case["lights"] if "lights" in case else case["light"],
        image_size=(height, width),
    )
    if "tform" in case:
        inputs.update(tform=case["tform"], crop_size=int(case["deca_image_size"]))
    return renderer(**inputs), inputs


@pytest.mark.parametrize("name", CASES)
def test_buffers_match_deca(fixture, name):
    renderer, cases, albedo = fixture
    case = cases[name]
    out, _ = _render(renderer, case, albedo)
    same = out["pix_to_face"] == case["pix_to_face"][..., 0]
    # README tolerances for a float32 re-implementation of pytorch3d + DECA
    assert same.float().mean() >= 0.999
    for ours, theirs in IMAGES.items():
        diff = (out[ours] - case[theirs]).abs() * same[:, None]
        assert diff.max() <= 1e-4, (ours, diff.max().item())
    if "shading_images" in case:
        assert ((out["shading"] - case["shading_images"]).abs() * same[:, None]).max() <= 1e-4


@pytest.mark.parametrize("name", ["direct_64", "direct_256"])
def test_project_is_decode_projection(fixture, name):
    _, cases, _ = fixture
    case = cases[name]
    # same float32 operations as batch_orth_proj + negation
    torch.testing.assert_close(project(case["verts"], case["cam"]), case["trans_verts"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["orig_224_to_256", "orig_64_to_72x96"])
def test_transform_points_matches_decode(fixture, name):
    _, cases, _ = fixture
    case = cases[name]
    hw = tuple(case["original_hw"].tolist())
    mapped = transform_points(case["trans_verts"], case["tform"], int(case["deca_image_size"]), hw)
    torch.testing.assert_close(mapped, case["trans_verts_orig"], atol=1e-6, rtol=0)


def test_vertex_normals_match_deca(fixture):
    renderer, cases, _ = fixture
    case = cases["direct_64"]
    # float32 accumulation order differs from DECA's three index_add_ passes
    torch.testing.assert_close(vertex_normals(case["verts"], renderer.faces), case["normals"], atol=1e-5, rtol=0)


def test_buffers_stack_rendered_normal_albedo(fixture):
    renderer, cases, albedo = fixture
    out, inputs = _render(renderer, cases["direct_64"], albedo)
    stacked = renderer.render_buffers(**inputs)
    assert stacked.shape == (2, 9, 64, 64)
    assert torch.equal(stacked, torch.cat([out["rendered"], out["normal"], out["albedo"]], 1))


def test_callers_trans_verts_are_not_modified(fixture):
    renderer, cases, albedo = fixture
    for name in ("direct_64", "orig_64_to_72x96"):
        case = dict(cases[name])
        case["trans_verts"] = case["trans_verts"].clone()
        before = case["trans_verts"].clone()
        _render(renderer, case, albedo)
        assert torch.equal(case["trans_verts"], before)


def test_non_invertible_tform_is_rejected(fixture):
    renderer, cases, albedo = fixture
    case = dict(cases["orig_64_to_72x96"])
    case["tform"] = torch.zeros(1, 3, 3)
    with pytest.raises(ValueError, match="not invertible"):
        _render(renderer, case, albedo)
    case["tform"] = torch.eye(4)[None]
    with pytest.raises(ValueError, match="tform"):
        _render(renderer, case, albedo)


def test_renderer_keeps_torch_module_buffers():
    # generic code (memory accounting) asks a module for its buffers: the renderer must not shadow nn.Module.buffers
    faces, uvcoords, uvfaces = read_obj(reference_file("flame", "head_template_synthetic.obj"))
    renderer = Renderer(faces, uvcoords, uvfaces, backend="torch")
    names = {name for name, _ in renderer.named_buffers()}
    assert len(list(renderer.buffers())) == len(names) > 0
