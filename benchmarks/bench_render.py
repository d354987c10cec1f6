"""Benchmark: DiffusionRig physical buffers (DECA render) at 256 px, seconds per render.

Meshes: the synthetic FLAME-format head of ../shared/reference/flame (1060 vertices, 2116
faces) and its midpoint subdivision (4234 vertices, 8464 faces), standing in for real FLAME
(5023 vertices, 9976 faces).  Times the rasterizer alone and the whole `Renderer.buffers`
call, batch 1 and 16, on the CPU (and CUDA when available), with the pytorch3d backend too
when it is installed.  Reference: DECA's SRenderY with pytorch3d on CPU takes 0.43 s for one
256 px render on 2 cores (../shared/reference/flame/README.md).

    python benchmarks/bench_render.py
    python benchmarks/bench_render.py --batch 1 --repeat 20
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from comfy_diffusionrig.face.buffers import Renderer, _raster_verts, project
from comfy_diffusionrig.face.flame_files import read_obj
from comfy_diffusionrig.face.rasterizer import _pytorch3d_available, rasterize

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "flame"


def read_mesh():
    """faces, uvcoords, uvfaces of the reference OBJ; world verts, cam, light, albedo of a render case."""
    mesh = read_obj(REFERENCE / "head_template_synthetic.obj")
    case = torch.load(REFERENCE / "render.pt", weights_only=True)["direct_256"]
    albedo = torch.load(REFERENCE / "flametex.pt", weights_only=True)["albedo"][:1]
    return mesh, case["verts"], case["cam"], case["lights"], albedo


def _split_edges(points: torch.Tensor, faces: torch.Tensor):
    """Midpoint subdivision of one index buffer: [..., N, D] points, [F, 3] -> 4F faces."""
    edges = torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]).sort(1).values
    unique, edge_of = torch.unique(edges, dim=0, return_inverse=True)
    midpoints = (points[..., unique[:, 0], :] + points[..., unique[:, 1], :]) / 2
    m01, m12, m20 = (edge_of + points.shape[-2]).reshape(3, -1)
    a, b, c = faces.unbind(1)
    new_faces = torch.cat([torch.stack(corners, 1) for corners in ((a, m01, m20), (m01, b, m12), (m20, m12, c), (m01, m12, m20))])
    return torch.cat([points, midpoints], -2), new_faces


def subdivide(mesh, verts):
    faces, uvcoords, uvfaces = mesh
    verts, new_faces = _split_edges(verts, faces)
    uvcoords, new_uvfaces = _split_edges(uvcoords, uvfaces)
    return (new_faces, uvcoords, new_uvfaces), verts


def seconds(fn, repeat: int, device) -> float:
    fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()

    mesh, verts, cam, light, albedo = read_mesh()
    meshes = {"synthetic 2116 faces": (mesh, verts)}
    meshes["subdivided 8464 faces"] = subdivide(mesh, verts)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    backends = ["torch"] + (["pytorch3d"] if _pytorch3d_available() else [])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, {args.size} px, median of {args.repeat}")
    print(f"{'mesh':<24}{'device':<8}{'backend':<11}{'batch':>6}{'raster s':>11}{'render s':>11}{'render s/img':>14}")
    for name, ((faces, uvcoords, uvfaces), mesh_verts) in meshes.items():
        for device in devices:
            for backend in backends:
                renderer = Renderer(faces, uvcoords, uvfaces, backend=backend).to(device)
                for batch in args.batch:
                    world = mesh_verts.expand(batch, -1, -1).to(device)
                    trans = project(world, cam.expand(batch, -1).to(device))
                    tex = albedo.expand(batch, -1, -1, -1).to(device)
                    sh = light.expand(batch, -1, -1).to(device)
                    screen = _raster_verts(trans, args.size, args.size)
                    raster = seconds(lambda: rasterize(screen, renderer.faces, args.size, backend), args.repeat, device)
                    with torch.no_grad():
                        render = seconds(lambda: renderer.render_buffers(world, trans, tex, sh, args.size), args.repeat, device)
                    print(f"{name:<24}{device.type:<8}{backend:<11}{batch:>6}{raster:>11.4f}{render:>11.4f}{render / batch:>14.4f}")


if __name__ == "__main__":
    main()
