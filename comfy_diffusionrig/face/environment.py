"""Environment maps: equirectangular panoramas as DECA SH lights, and the files they come in.

Axes (FLAME frame, as `lighting.py`): +x = image right, +y = up, +z = towards the camera.  A
panorama is laid out as seen from the face's position, continuing the camera's view:

- the top row is straight up (+y), the bottom row straight down;
- the centre column is the direction the camera looks along (-z: what is behind the face in
  the photo, so a light there is a back light); moving right in the panorama turns right, so
  the column 3/4 of the way across is +x (image right) and the left and right edges are +z,
  behind the camera (a light there is a frontal light).

Radiance files: Radiance `.hdr` (flat and RLE scanlines) with the reader and writer below;
`.exr` through the OpenEXR package when it is installed; any other image file is read as an
8-bit sRGB panorama and linearised.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from .lighting import light_parameters, normalize_light, rotation_matrix, sh_from_radiance

LEVELS = ("portrait", "as exposed")  # how bright `environment_light` makes a panorama's light


def srgb_to_linear(image):
    """sRGB-encoded values in [0, 1] -> linear radiance (IEC 61966-2-1), numpy or torch."""
    lib = torch if torch.is_tensor(image) else np
    return lib.where(image <= 0.04045, image / 12.92, ((image + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(image):
    """Linear values in [0, 1] -> sRGB-encoded values (inverse of `srgb_to_linear`)."""
    lib = torch if torch.is_tensor(image) else np
    return lib.where(image <= 0.0031308, image * 12.92, 1.055 * lib.clip(image, 0.0031308, None) ** (1 / 2.4) - 0.055)


def panorama_directions(height: int, width: int, rows: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre directions and solid angles of an equirectangular panorama (module docstring).

    rows: which rows (a slice), to work on a large panorama in pieces.
    Returns: directions [R, W, 3] float64 unit vectors, solid_angle [R] float64 per pixel of each
    row (the exact area of the row's band, which is sin(theta) d theta d phi integrated: over all
    rows they sum to 4 pi).
    """
    index = torch.arange(height, dtype=torch.float64)[rows]
    theta = (index + 0.5) / height * math.pi  # from +y
    phi = ((torch.arange(width, dtype=torch.float64) + 0.5) / width - 0.5) * 2 * math.pi  # 0 = -z, + = to +x
    sin_t, cos_t = torch.sin(theta)[:, None], torch.cos(theta)[:, None]
    directions = torch.stack(torch.broadcast_tensors(sin_t * torch.sin(phi), cos_t, -sin_t * torch.cos(phi)), -1)
    top, bottom = index / height * math.pi, (index + 1) / height * math.pi
    solid_angle = (torch.cos(top) - torch.cos(bottom)) * (2 * math.pi / width)
    return directions, solid_angle


def direction_to_pixel(direction, height: int, width: int) -> tuple[float, float]:
    """(column, row) in pixels (continuous, 0 = left / top edge) where a FLAME-frame direction lies."""
    x, y, z = (float(v) for v in direction)
    length = math.sqrt(x * x + y * y + z * z) or 1.0
    theta = math.acos(max(-1.0, min(1.0, y / length)))
    phi = math.atan2(x, -z)
    return (phi / (2 * math.pi) + 0.5) * width, theta / math.pi * height


def _as_environment(env) -> torch.Tensor:
    env = torch.as_tensor(np.asarray(env) if not torch.is_tensor(env) else env).cpu()
    if not env.is_floating_point():
        env = env.double()
    if env.ndim != 3 or env.shape[-1] != 3 or env.shape[0] < 2 or env.shape[1] < 4:
        raise ValueError(f"an environment map is an equirectangular [H, W, 3] linear RGB array (H >= 2, W >= 4), "
                         f"got shape {tuple(env.shape)}")
    if not bool(torch.isfinite(env).all()):
        raise ValueError("the environment map contains NaN or infinite values")
    if bool((env < 0).any()):
        raise ValueError(f"the environment map has negative radiance (min {float(env.min()):.3g}); "
                         "radiance is >= 0 (is it a log or signed image?)")
    return env


def sh_from_environment(env, yaw: float = 0.0) -> torch.Tensor:
    """DECA's 9x3 SH light code of an equirectangular environment map.

    env: [H, W, 3] float array or tensor of linear radiance, laid out as the module docstring
        says (top row up; centre column = the direction the camera looks along, towards the
        face and beyond it; image-left of the centre is the subject's right, -x).
    yaw: degrees to turn the environment about the vertical axis before lighting; positive
        moves a light that is in front of the face towards image right, as Relight's "rotate
        fitted light" azimuth does (the panorama content scrolls left by yaw / 360 of its width).
    Returns: [9, 3] float32 in DECA's basis and constants (`lighting.sh_basis`): a light from
    direction d in the panorama lights the normals facing d.  Shading units: a uniform panorama
    of radiance L shades every normal with L (see `lighting.sh_from_radiance`); pixels are
    weighted by their solid angle (sin theta per row); panoramas of more than 256 rows are first
    averaged over blocks (solid-angle weighted), a change order-2 SH hardly sees (~1e-4).  Use
    `lighting.normalize_light` to bring the result to the presets' level.
    """
    env = _reduced(_as_environment(env))
    height, width = env.shape[:2]
    turn = rotation_matrix(yaw, 0.0).T  # every direction turned: d -> R d (row vectors)
    light = torch.zeros(9, 3, dtype=torch.float64)
    step = max(1, _PIXELS_AT_ONCE // width)  # a large panorama in pieces of rows, to bound memory
    for first in range(0, height, step):
        rows = slice(first, min(first + step, height))
        directions, solid_angle = panorama_directions(height, width, rows)
        weights = solid_angle[:, None].expand(-1, width)
        light += sh_from_radiance((directions @ turn).reshape(-1, 3), env[rows].double().reshape(-1, 3),
                                  weights.reshape(-1)).double()
    return light.float()


def environment_light(env, yaw: float = 0.0, exposure: float = 0.0, level: str = "portrait") -> torch.Tensor:
    """The light [9, 3] that Light from Environment and `relight --light-env` give a panorama: `sh_from_environment`
    turned by yaw, at `level` ("portrait": `lighting.normalize_light`, the presets' brightest point, whatever
    the panorama's exposure; "as exposed": its own radiance), then `exposure` stops brighter (x 2**exposure)."""
    if level not in LEVELS:
        raise ValueError(f"unknown level {level!r}: choose one of {', '.join(LEVELS)}")
    light = sh_from_environment(env, yaw=yaw)
    if level == "portrait":
        light = normalize_light(light)
    return light * 2.0 ** exposure


_PIXELS_AT_ONCE = 1 << 18
# order-2 SH see nothing finer than tens of degrees: larger panoramas (an 8k HDRI) are averaged down to this
_MAX_ROWS = 256


def _reduced(env: torch.Tensor) -> torch.Tensor:
    """A panorama of more than _MAX_ROWS rows averaged over k x k blocks, each pixel weighted by its solid
    angle, so that the sum of radiance x solid angle of every block is kept; unchanged when no integer
    k up to twice the needed factor divides both sides (then it is projected at full size, in pieces)."""
    height, width = env.shape[:2]
    need = math.ceil(height / _MAX_ROWS)
    factor = next((k for k in range(need, 2 * need + 1) if height % k == 0 and width % k == 0), 1)
    if factor == 1:
        return env
    _, solid_angle = panorama_directions(height, width)
    weighted = env * solid_angle.to(env.dtype)[:, None, None]  # in the panorama's precision: no 8k float64 copy
    blocks = weighted.reshape(height // factor, factor, width // factor, factor, 3).sum((1, 3), dtype=torch.float64)
    block_angle = solid_angle.reshape(height // factor, factor).sum(1) * factor
    return blocks / block_angle[:, None, None]


def roll_yaw(env, yaw: float):
    """The panorama as `sh_from_environment(env, yaw)` sees it, to the nearest column ([H, W, 3], same type)."""
    shift = -int(round(yaw / 360.0 * env.shape[1]))
    return torch.roll(env, shift, dims=1) if torch.is_tensor(env) else np.roll(env, shift, axis=1)


def environment_preview(env, light: torch.Tensor, yaw: float = 0.0, width: int = 512) -> torch.Tensor:
    """The panorama (turned by yaw, tone-mapped to sRGB) with the light's dominant direction marked.

    env: [H, W, 3] linear radiance; light: [9, 3] (`sh_from_environment(env, yaw)`, maybe scaled).
    The marker (a red ring with a cross) sits where the light's linear SH band points, i.e. the
    side the face is lit from.  Returns: [width // 2, width, 3] float32 in [0, 1].
    """
    from PIL import Image, ImageDraw

    turned = roll_yaw(_as_environment(env), yaw).float().permute(2, 0, 1)[None]
    # area-averaged to the preview size first: a small sun stays visible and an 8k panorama stays cheap
    small = torch.nn.functional.adaptive_avg_pool2d(turned, (width // 2, width))[0].permute(1, 2, 0).numpy()
    white = max(float(np.percentile(small.max(-1), 99.0)), 1e-8)  # the brightest 1 % may clip
    picture = linear_to_srgb(np.clip(small / white, 0.0, 1.0))
    image = Image.fromarray((picture * 255).round().astype(np.uint8), "RGB")
    azimuth, elevation = (float(v) for v in light_parameters(light.double())[:2])
    direction = (math.sin(math.radians(azimuth)) * math.cos(math.radians(elevation)), math.sin(math.radians(elevation)),
                 math.cos(math.radians(azimuth)) * math.cos(math.radians(elevation)))
    column, row = direction_to_pixel(direction, width // 2, width)
    draw = ImageDraw.Draw(image)
    radius = max(4, width // 40)
    for offset in (-width, 0, width):  # a marker at the seam shows on both edges
        cx = column + offset
        draw.ellipse((cx - radius, row - radius, cx + radius, row + radius), outline=(255, 0, 0), width=2)
        draw.line((cx - 2 * radius, row, cx + 2 * radius, row), fill=(255, 0, 0), width=1)
        draw.line((cx, row - 2 * radius, cx, row + 2 * radius), fill=(255, 0, 0), width=1)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)


def disk_environment(height: int, width: int, lights, background=(0.0, 0.0, 0.0)) -> torch.Tensor:
    """A panorama of round area lights on a uniform background.

    lights: iterable of (azimuth_deg, elevation_deg, radius_deg, rgb radiance), the direction
    the light comes from as `lighting.light_direction` reads it (azimuth + = image right).
    Returns: [H, W, 3] float64 linear radiance.
    """
    from .lighting import light_direction

    directions, _ = panorama_directions(height, width)
    env = torch.tensor(background, dtype=torch.float64).expand(height, width, 3).clone()
    for azimuth, elevation, radius, rgb in lights:
        inside = directions @ light_direction(azimuth, elevation) >= math.cos(math.radians(radius))
        env[inside] = torch.tensor(rgb, dtype=torch.float64)
    return env


# The example studio (example_images/studio_key_fill.hdr): a warm soft box up on image right, a
# cool, dimmer and larger fill low on image left, a dim grey room
STUDIO_LIGHTS = ((50.0, 25.0, 12.0, (40.0, 32.0, 22.0)), (-60.0, 5.0, 18.0, (3.0, 4.0, 6.0)))
STUDIO_BACKGROUND = (0.05, 0.05, 0.05)


def studio_environment(height: int = 64, width: int = 128) -> torch.Tensor:
    """The example two-light studio panorama ([H, W, 3] float64 linear radiance)."""
    return disk_environment(height, width, STUDIO_LIGHTS, STUDIO_BACKGROUND)


# --- Radiance .hdr (RGBE) files ------------------------------------------------------------------------------------

_HDR_MAGIC = (b"#?RADIANCE", b"#?RGBE")
_HDR_HINT = "expected a Radiance .hdr (RGBE) panorama; re-export it from your HDR tool"


def _rgbe_to_float(rgbe: np.ndarray) -> np.ndarray:
    """[..., 4] uint8 RGBE -> [..., 3] float32; mantissas read at their centre (+0.5), as Radiance does."""
    exponent = rgbe[..., 3].astype(np.int32)
    scale = np.where(exponent > 0, np.ldexp(1.0, exponent - 136), 0.0)
    return ((rgbe[..., :3].astype(np.float64) + 0.5) * scale[..., None]).astype(np.float32)


def _float_to_rgbe(image: np.ndarray) -> np.ndarray:
    """[..., 3] float -> [..., 4] uint8 RGBE (shared exponent of the largest channel)."""
    image = np.asarray(image, dtype=np.float64)
    largest = image.max(-1)
    mantissa, exponent = np.frexp(largest)  # largest = mantissa * 2^exponent, mantissa in [0.5, 1)
    visible = largest > 1e-32
    scale = np.where(visible, mantissa * 256.0 / np.where(visible, largest, 1.0), 0.0)
    rgbe = np.zeros(image.shape[:-1] + (4,), dtype=np.uint8)
    rgbe[..., :3] = np.clip(np.floor(image * scale[..., None]), 0, 255)
    rgbe[..., 3] = np.where(visible, exponent + 128, 0)
    return rgbe


def read_hdr(path: str | os.PathLike) -> np.ndarray:
    """A Radiance .hdr file -> [H, W, 3] float32 linear radiance, top row first.

    Reads flat and run-length-encoded (RLE) scanlines of the "-Y H +X W" orientation.  Raises
    ValueError naming the file when it is not such a file, is truncated or its runs are broken.
    """
    path = Path(path)
    data = path.read_bytes()

    def fail(problem: str) -> ValueError:
        return ValueError(f"{path}: {problem}; {_HDR_HINT}")

    if not data.startswith(_HDR_MAGIC):
        raise fail("not a Radiance .hdr file (no #?RADIANCE header)")
    position, fmt = 0, None
    while True:  # header lines up to an empty line
        end = data.find(b"\n", position)
        if end < 0:
            raise fail("the header never ends (no empty line before the resolution)")
        line = data[position:end].strip()
        position = end + 1
        if not line:
            break
        if line.startswith(b"FORMAT="):
            fmt = line[len(b"FORMAT="):]
    if fmt not in (None, b"32-bit_rle_rgbe"):
        raise fail(f"pixel format {fmt.decode(errors='replace')!r} is not supported (only 32-bit_rle_rgbe)")
    end = data.find(b"\n", position)
    size = data[position:end if end >= 0 else len(data)].split()
    if len(size) != 4 or size[0] != b"-Y" or size[2] != b"+X" or not (size[1].isdigit() and size[3].isdigit()):
        raise fail(f"unsupported resolution line {b' '.join(size).decode(errors='replace')!r} (expected '-Y H +X W')")
    height, width = int(size[1]), int(size[3])
    if end < 0 or height < 1 or width < 1:
        raise fail("no pixel data after the resolution line")
    body = np.frombuffer(data, dtype=np.uint8, offset=end + 1)
    rgbe = np.empty((height, width, 4), dtype=np.uint8)
    cursor = 0
    for row in range(height):
        head = body[cursor:cursor + 4]
        if 8 <= width < 32768 and len(head) == 4 and head[0] == 2 and head[1] == 2 and head[2] < 128:
            if (int(head[2]) << 8 | int(head[3])) != width:
                raise fail(f"scanline {row} announces width {int(head[2]) << 8 | int(head[3])}, the image is {width}")
            cursor += 4
            for channel in range(4):
                filled = 0
                while filled < width:
                    if cursor >= len(body):
                        raise fail(f"truncated in scanline {row} of {height}")
                    count = int(body[cursor])
                    if count > 128:  # a run of one byte
                        count -= 128
                        if filled + count > width or cursor + 1 >= len(body):
                            raise fail(f"broken run-length data in scanline {row}")
                        rgbe[row, filled:filled + count, channel] = body[cursor + 1]
                        cursor += 2
                    else:  # count literal bytes
                        if count == 0 or filled + count > width or cursor + 1 + count > len(body):
                            raise fail(f"broken run-length data in scanline {row}")
                        rgbe[row, filled:filled + count, channel] = body[cursor + 1:cursor + 1 + count]
                        cursor += 1 + count
                    filled += count
        else:  # a flat scanline: width RGBE quadruples
            if cursor + 4 * width > len(body):
                raise fail(f"truncated in scanline {row} of {height}")
            rgbe[row] = body[cursor:cursor + 4 * width].reshape(width, 4)
            cursor += 4 * width
    return _rgbe_to_float(rgbe)


def _rle_channel(values: np.ndarray) -> bytes:
    """One channel of one scanline in Radiance's RLE: runs of >= 4 equal bytes, literals between."""
    out, start, width = bytearray(), 0, len(values)
    literal_start = 0
    while start < width:
        run = 1
        while start + run < width and run < 127 and values[start + run] == values[start]:
            run += 1
        if run >= 4:
            for first in range(literal_start, start, 128):  # flush pending literals
                chunk = values[first:min(first + 128, start)]
                out += bytes([len(chunk)]) + chunk.tobytes()
            out += bytes([128 + run, int(values[start])])
            start += run
            literal_start = start
        else:
            start += run
    for first in range(literal_start, width, 128):
        chunk = values[first:min(first + 128, width)]
        out += bytes([len(chunk)]) + chunk.tobytes()
    return bytes(out)


def write_hdr(path: str | os.PathLike, image, rle: bool = True) -> Path:
    """Write [H, W, 3] linear radiance as a Radiance .hdr file (RLE scanlines, or flat ones).

    RGBE keeps 8 mantissa bits per channel under a shared exponent (relative error < 1/256 of
    the pixel's largest channel).  Written atomically (temporary file, then rename).
    """
    path = Path(path)
    image = np.asarray(image.cpu() if torch.is_tensor(image) else image, dtype=np.float64)
    if image.ndim != 3 or image.shape[-1] != 3 or not np.isfinite(image).all() or (image < 0).any():
        raise ValueError(f"write_hdr needs a finite, non-negative [H, W, 3] image, got shape {image.shape}")
    height, width = image.shape[:2]
    rgbe = _float_to_rgbe(image)
    parts = [b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n", f"-Y {height} +X {width}\n".encode()]
    for row in rgbe:
        if rle and 8 <= width < 32768:
            parts.append(bytes([2, 2, width >> 8, width & 255]))
            parts += [_rle_channel(row[:, channel]) for channel in range(4)]
        else:
            parts.append(row.tobytes())
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_bytes(b"".join(parts))
    os.replace(temporary, path)
    return path


def _read_exr(path: Path) -> np.ndarray:
    try:
        import OpenEXR
    except ImportError:
        raise ValueError(f"{path}: reading .exr needs the OpenEXR package (pip install OpenEXR), which is not "
                         "installed; install it, or convert the panorama to Radiance .hdr") from None
    try:
        with OpenEXR.File(str(path)) as exr:
            channels = exr.channels()
            if "RGB" in channels or "RGBA" in channels:
                pixels = np.asarray(channels.get("RGB", channels.get("RGBA")).pixels)[..., :3]
            else:
                pixels = np.stack([np.asarray(channels[c].pixels) for c in "RGB"], -1)
    except Exception as exc:  # OpenEXR raises its own types for unreadable files and missing channels
        raise ValueError(f"{path}: not a readable RGB OpenEXR file ({type(exc).__name__}: {exc})") from exc
    return pixels.astype(np.float32)


def load_environment(path: str | os.PathLike) -> np.ndarray:
    """A panorama file -> [H, W, 3] float32 linear radiance.

    .hdr / .pic: Radiance (`read_hdr`); .exr: OpenEXR when installed; anything else: an 8-bit
    image read with PIL as sRGB and linearised (values in [0, 1]).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"environment map {path} not found")
    suffix = path.suffix.lower()
    if suffix in (".hdr", ".pic"):
        return read_hdr(path)
    if suffix == ".exr":
        return _read_exr(path)
    from ..photo.loading import load_image

    picture = np.asarray(load_image(path), dtype=np.float32) / 255.0
    return srgb_to_linear(picture).astype(np.float32)
