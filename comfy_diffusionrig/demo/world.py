"""The demo's synthetic world: subjects with their own shape, texture, personal marks and background,
photographed (with their DiffusionRig buffers) under many lights, expressions and poses."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from ..face.buffers import DECA_CROP_SIZE, Renderer, project
from ..core.conventions import EYE_LEFT, EYE_RIGHT, MOUTH_LEFT, MOUTH_RIGHT
from ..face.flame import ffhq_center, head_id, load_flame, load_flame_texture
from ..face.flame_files import read_obj
from ..face.lighting import sh_from_direction
from ..face.rig import FaceRig


class World:
    """Renders photos and DiffusionRig buffers of synthetic subjects."""

    def __init__(self, flame_dir: Path, size: int, seed: int):
        self.flame = load_flame(flame_dir / "generic_model.pkl", flame_dir / "landmark_embedding.npy")
        self.texture = load_flame_texture(flame_dir / "FLAME_texture.npz")
        faces, uvcoords, uvfaces = read_obj(flame_dir / "head_template.obj", n_vertices=self.flame.v_template.shape[0],
                                            n_faces=self.flame.faces.shape[0])
        self.renderer = Renderer(faces, uvcoords, uvfaces, backend="torch")
        self.size = size
        self.gen = torch.Generator().manual_seed(seed)
        self.cam = self._ffhq_camera()
        self.mark_sites = self._front_uv(uvcoords, uvfaces)

    def _ffhq_camera(self) -> torch.Tensor:
        """[s, tx, ty] framing the neutral head as FFHQ alignment frames a face (eyes/mouth rule)."""
        zeros = lambda n: torch.zeros(1, n)  # noqa: E731
        _, lmk2d, _ = self.flame(zeros(100), zeros(50), zeros(6))
        p = lmk2d[0, :, :2].double()
        eye_l, eye_r = p[EYE_LEFT].mean(0), p[EYE_RIGHT].mean(0)
        eye_avg, mouth_avg = (eye_l + eye_r) / 2, (p[MOUTH_LEFT] + p[MOUTH_RIGHT]) / 2
        half = max(float((eye_r - eye_l).norm()) * 2.0, float((mouth_avg - eye_avg).norm()) * 1.8)  # FFHQ quad
        centre = ffhq_center(lmk2d)[0, :2].double()
        return torch.tensor([1.0 / half, -float(centre[0]), -float(centre[1])])

    def _front_uv(self, uvcoords: torch.Tensor, uvfaces: torch.Tensor) -> torch.Tensor:
        """UV positions of the front of the neutral face (where personal marks are visible)."""
        zeros = lambda n: torch.zeros(1, n)  # noqa: E731
        verts, _, _ = self.flame(zeros(100), zeros(50), zeros(6))
        v = verts[0]
        faces = self.flame.faces
        tri = v[faces]
        normal = torch.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=-1)
        normal = normal / normal.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        centre = tri.mean(1)
        proj = project(centre[None], self.cam[None])[0]
        front = (normal[:, 2] > 0.6) & (proj[:, :2].abs().max(-1).values < 0.6)
        return uvcoords[uvfaces[front]].mean(1)

    def subjects(self, n: int) -> list[dict]:
        """Identity of n subjects: shape, texture code, personal albedo marks, background colours."""
        g = self.gen
        out = []
        for _ in range(n):
            marks = torch.zeros(3, 256, 256)
            yy, xx = torch.meshgrid(torch.linspace(1, 0, 256), torch.linspace(0, 1, 256), indexing="ij")
            for _ in range(int(torch.randint(2, 5, (1,), generator=g))):
                site = self.mark_sites[int(torch.randint(len(self.mark_sites), (1,), generator=g))]
                sigma = 0.015 + 0.03 * float(torch.rand(1, generator=g))
                blob = torch.exp(-((xx - site[0]) ** 2 + (yy - site[1]) ** 2) / (2 * sigma ** 2))
                colour = torch.rand(3, generator=g) * 1.2 - 0.7  # darker or coloured marks
                marks += colour[:, None, None] * blob
            out.append({"shape": 1.2 * torch.randn(100, generator=g) * torch.linspace(1, 0.2, 100),
                        "tex": 1.2 * torch.randn(50, generator=g) * torch.linspace(1, 0.2, 50),
                        "marks": marks, "background": torch.rand(2, 3, generator=g) * 0.8 + 0.1})
        return out

    def views(self, n: int) -> list[dict]:
        """n random photo conditions: expression, head and jaw pose, light, small framing jitter."""
        g = self.gen
        out = []
        for _ in range(n):
            u = lambda lo, hi: lo + (hi - lo) * float(torch.rand(1, generator=g))  # noqa: E731
            pose = torch.zeros(6)
            pose[0], pose[1] = math.radians(u(-12, 12)), math.radians(u(-30, 30))
            pose[3] = math.radians(u(0, 12))
            tint = 1 + 0.15 * (torch.rand(3, generator=g) - 0.5)
            light = sh_from_direction(u(-80, 80), u(-30, 60), intensity=u(0.6, 1.1), ambient=u(0.35, 0.7),
                                      color=tint)
            cam = self.cam * torch.tensor([u(0.95, 1.05), 1.0, 1.0]) + torch.tensor([0.0, u(-0.004, 0.004),
                                                                                     u(-0.004, 0.004)])
            out.append({"exp": 0.8 * torch.randn(50, generator=g) * torch.linspace(1, 0.1, 50), "pose": pose,
                        "light": torch.as_tensor(light, dtype=torch.float32), "cam": cam})
        return out

    @torch.no_grad()
    def rig(self, subject: dict, views: list[dict]) -> FaceRig:
        """The true rig of `photograph(subject, views)`, as the pack's renderer takes it: `render_rig` of it
        with a DECA holding this world's FLAME files gives photograph's buffers (the crop space drawn
        straight onto the S px image, the head left where the camera put it)."""
        n = len(views)
        stack = lambda key: torch.stack([v[key] for v in views]).float()  # noqa: E731
        codes = {"shape": subject["shape"].expand(n, -1).clone(), "tex": subject["tex"].expand(n, -1).clone(),
                 "exp": stack("exp"), "pose": stack("pose"), "cam": stack("cam"), "light": stack("light")}
        _, lmk2d, _ = self.flame(codes["shape"], codes["exp"], codes["pose"])
        scale = self.size / DECA_CROP_SIZE  # crop pixels -> image pixels: the identity in [-1, 1] coordinates
        tform = torch.diag(torch.tensor([scale, scale, 1.0])).expand(n, 3, 3).clone()
        return FaceRig(codes, tform, ffhq_center(lmk2d), (self.size, self.size), head_id(self.flame))

    @torch.no_grad()
    def photograph(self, subject: dict, views: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> photos [N,3,S,S] in [-1,1] (2x supersampled, with the marks) and buffers [N,9,S,S] (DECA-like)."""
        n = len(views)
        stack = lambda key: torch.stack([v[key] for v in views])  # noqa: E731
        shape, tex = subject["shape"].expand(n, -1), subject["tex"].expand(n, -1)
        verts, _, _ = self.flame(shape, stack("exp"), stack("pose"))
        trans = project(verts, stack("cam"))
        albedo = self.texture(tex)
        marked = albedo + F.interpolate(subject["marks"][None], size=albedo.shape[-2:], mode="bilinear",
                                        align_corners=False)
        light = stack("light")
        s = self.size
        big = self.renderer(verts, trans, marked, light, image_size=(2 * s, 2 * s))
        lo, hi = subject["background"]
        ramp = torch.linspace(0, 1, 2 * s)[:, None].expand(2 * s, 2 * s)
        background = lo[:, None, None] * (1 - ramp) + hi[:, None, None] * ramp
        photo = big["alpha"] * big["rendered"].clamp(0, 1) + (1 - big["alpha"]) * background
        photo = F.avg_pool2d(photo, 2) * 2 - 1
        buffers = self.renderer.render_buffers(verts, trans, albedo, light, image_size=(s, s))
        return photo.clamp(-1, 1), buffers
