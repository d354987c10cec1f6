"""Our own conventions, checked by a route independent of the code under test.

Each test would fail if the convention were broken in the code (a flipped sign, a halved
constant, an ignored setting): the eta noise scale against the DDPM posterior variance, the
gradient clipping seen at the optimizer, SSIM against a second implementation, and the signs
of head yaw / pitch / roll and of light rotation read off rendered buffers (not the formulas).
"""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from comfy_diffusionrig.model import diffusion as D
from comfy_diffusionrig.face.lighting import rotate_sh, sh_from_direction
from comfy_diffusionrig.demo.metrics import ssim
from comfy_diffusionrig.face.rig import edit_pose, render_rig


# ----------------------------------------------------------------------------- eta


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_eta_noise_has_the_ddpm_posterior_variance_times_eta_squared(eta):
    """A denoiser that predicts zero noise from x_T = 0 gives x0 = 0, so one DDIM step returns exactly the
    fresh noise sigma * z. At eta = 1 DDIM is DDPM ancestral sampling: sigma^2 is DDPM's posterior variance
    beta_t (1 - abar_(t-1)) / (1 - abar_t), written here from the betas (the sampler uses the abar ratio)."""
    zero_eps = lambda x, t, buffers, code: torch.zeros_like(x)  # noqa: E731
    batch, size = 256, 8
    seen = []
    D.ddim_sample(zero_eps, torch.zeros(batch, 9, size, size), torch.zeros(batch, 64), torch.zeros(1, 3, size, size),
                  steps=2, eta=eta, clip=False, generator=torch.Generator().manual_seed(0),
                  callback=lambda step, total, x, x0: seen.append(x.clone()))
    sched = D.respace(D.base_schedule(), 2)  # t = 0, 500
    betas = sched.betas
    abar = np.cumprod(1 - betas)
    posterior = betas[1] * (1 - abar[0]) / (1 - abar[1])
    expected = eta * math.sqrt(posterior)
    measured = float(seen[0].std())
    assert measured == pytest.approx(expected, rel=0.02)  # 49k samples: 0.3 % standard error


# ----------------------------------------------------------------------------- gradient clipping


def test_gradient_clipping_reaches_the_optimizer(monkeypatch):
    """The gradient norm the optimizer sees is at most grad_clip, and without clipping it is larger."""
    from comfy_diffusionrig.train.loop import TrainConfig, TrainingData, train
    from comfy_diffusionrig.model.unet import DiffusionRig, UNetConfig

    norms = []
    real_step = torch.optim.Adam.step

    def spy(self, *args, **kwargs):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    cfg = UNetConfig(image_size=16, num_channels=32, num_res_blocks=1, channel_mult=(1, 2),
                     attention_resolutions=(8,), num_head_channels=16, dropout=0.0)
    g = torch.Generator().manual_seed(0)
    data = TrainingData(torch.rand(4, 3, 16, 16, generator=g) * 2 - 1, torch.rand(4, 9, 16, 16, generator=g))
    clip = 1e-3
    for grad_clip in (clip, None):
        torch.manual_seed(0)
        model = DiffusionRig(cfg)
        train(model, data, TrainConfig(steps=3, batch_size=2, lr=1e-4, grad_clip=grad_clip, precision="fp32"))
    clipped, free = norms[:3], norms[3:]
    assert all(n <= clip * (1 + 1e-4) for n in clipped), clipped
    assert all(n > 10 * clip for n in free), free  # so the clip above really did something


# ----------------------------------------------------------------------------- SSIM


def _ssim_numpy(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM (Wang et al. 2004) written independently: scipy's Gaussian filter (sigma 1.5, 11 taps) over each
    channel, statistics at the window centres that fit inside the image, mean over channels and windows."""
    from scipy.ndimage import gaussian_filter

    c1, c2 = 0.01 ** 2, 0.03 ** 2
    scores = []
    for x, y in zip(a, b):
        blur = lambda t: gaussian_filter(t, 1.5, truncate=5 / 1.5, mode="constant")[5:-5, 5:-5]  # noqa: E731
        mx, my = blur(x), blur(y)
        vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
        scores.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2)))
    return float(np.mean(scores))


def test_ssim_matches_an_independent_implementation():
    g = torch.Generator().manual_seed(3)
    clean = torch.rand(2, 3, 40, 36, generator=g, dtype=torch.float64)
    clean = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(clean, (1, 1, 1, 1), mode="replicate"), 3, 1)
    noisy = (clean + 0.08 * torch.randn(clean.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    ours = ssim(noisy, clean)
    for k in range(2):
        assert float(ours[k]) == pytest.approx(_ssim_numpy(noisy[k].numpy(), clean[k].numpy()), abs=1e-5)
    assert 0.2 < float(ours.mean()) < 0.95  # a real comparison, not a trivial 1 or 0


# ----------------------------------------------------------------------------- rendered signs


@pytest.fixture(scope="module")
def head(demo_models):
    """The synthetic DECA/FLAME of `demo-assets`, framed as it fits the astronaut photo, turned frontal and neutral."""
    from comfy_diffusionrig.photo.alignment import align_faces
    from comfy_diffusionrig.photo.loading import load_image
    from comfy_diffusionrig.face.deca import load_deca
    from comfy_diffusionrig.face.rig import fit_faces

    deca = load_deca(demo_models / "deca" / "deca_model.tar", demo_models / "flame", backend="torch")
    photo = load_image(Path(__file__).resolve().parents[1] / "example_images" / "astronaut.png")
    aligned = align_faces(photo, mode="largest", size=128)
    images = torch.from_numpy(np.stack([np.asarray(a.image, np.float32) / 255 for a in aligned])).permute(0, 3, 1, 2)
    rig = fit_faces(deca, images, np.stack([a.landmarks for a in aligned]))
    rig = rig.with_codes(pose=torch.zeros(1, 6), exp=torch.zeros(1, 50))
    return deca, rig.with_light(sh_from_direction(0.0, 0.0, 0.8, 0.5))


def test_head_turns_in_the_rendered_frame(head):
    """The rendered normal map pins FLAME's axes to the picture (x = image right, y = up: the face's image-right
    side faces +x, its top faces +y); then FLAME's own posing (its Rodrigues and skinning, not our Euler
    formula) shows that yaw + turns the nose to image right, pitch + lowers it, roll + tilts the top of the head
    to image right."""
    deca, rig = head
    buffers = render_rig(deca, rig)[0]
    covered = buffers[3:6].abs().sum(0) > 0
    assert covered.float().mean() > 0.1  # the head is in the picture
    rows, columns = torch.meshgrid(torch.arange(covered.shape[0]), torch.arange(covered.shape[1]), indexing="ij")
    cx, cy = float(columns[covered].float().mean()), float(rows[covered].float().mean())
    assert buffers[3][covered & (columns > cx + 10)].mean() > 0.2 > -0.2 > buffers[3][covered & (columns < cx - 10)].mean()
    assert buffers[4][covered & (rows < cy - 10)].mean() > buffers[4][covered & (rows > cy + 10)].mean() + 0.2

    def posed(edited):
        verts, _, lmk3d = deca.flame(edited.codes["shape"], edited.codes["exp"], edited.codes["pose"])
        return verts[0] - verts[0].mean(0), lmk3d[0, 30] - verts[0].mean(0)  # landmark 30: the nose tip

    verts, nose = posed(rig)
    top = int(verts[:, 1].argmax())  # the crown of the neutral head
    _, yaw_nose = posed(edit_pose(rig, yaw=25.0))
    _, pitch_nose = posed(edit_pose(rig, pitch=20.0))
    rolled, _ = posed(edit_pose(rig, roll=20.0))
    assert float(yaw_nose[0] - nose[0]) > 0.1 * float(nose[2])  # towards image right
    assert float(pitch_nose[1] - nose[1]) < -0.1 * float(nose[2])  # down
    assert float(rolled[top, 0] - verts[top, 0]) > 0.1 * float(verts[top, 1])  # the crown to image right


def test_light_rotation_and_direction_read_off_the_rendered_face(head):
    """A light from azimuth + lights the face's image-right side; rotate_sh with yaw + moves a frontal light
    there too, and pitch + moves it up (the shaded render, not the SH formulas)."""
    deca, rig = head

    def sides(light):
        buffers = render_rig(deca, rig.with_light(light))[0]
        shaded, covered = buffers[0:3].mean(0), buffers[3:6].abs().sum(0) > 0
        rows, columns = torch.meshgrid(torch.arange(covered.shape[0]), torch.arange(covered.shape[1]), indexing="ij")
        cx, cy = float(columns[covered].float().mean()), float(rows[covered].float().mean())
        mean = lambda where: float(shaded[covered & where].mean())  # noqa: E731
        return mean(columns > cx) - mean(columns < cx), mean(rows < cy) - mean(rows > cy)  # right-left, top-bottom

    frontal = sh_from_direction(0.0, 0.0, 0.9, 0.3)
    assert sides(sh_from_direction(60.0, 0.0, 0.9, 0.3))[0] > 0.05
    assert sides(sh_from_direction(-60.0, 0.0, 0.9, 0.3))[0] < -0.05
    assert sides(rotate_sh(frontal, yaw_deg=60.0))[0] > 0.05
    assert sides(rotate_sh(frontal, pitch_deg=50.0))[1] > sides(frontal)[1] + 0.05
    assert sides(sh_from_direction(0.0, 50.0, 0.9, 0.3))[1] > sides(frontal)[1] + 0.05
