"""`invert_faces` and `edit_faces`: the one invert-then-sample path of the nodes, the CLI and the demo.

A small random DiffusionRig (any weights: the properties hold for every model) checks that a
batch of faces gives, face for face, what each face gives alone, that each face is inverted
under its own buffers and code, that frames of a face share its start, the progress count,
and that an edit from a kept inverted start is the one-call edit bit for bit and refuses a
start made with other settings or another model.
"""

import copy
import math

import pytest
import torch

from comfy_diffusionrig import InvertedStart, ddim_invert, ddim_sample, edit_faces, invert_faces
from comfy_diffusionrig.model.unet import DiffusionRig, UNetConfig

SIZE = 16
BATCH_ATOL = 1e-3  # batched vs one-at-a-time: float32 round-off, amplified up to ~16x (1/sqrt(abar) at t=950) by DDIM


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = UNetConfig(image_size=SIZE, num_channels=32, num_res_blocks=1, channel_mult=(1, 2),
                     attention_resolutions=(SIZE // 2,), num_head_channels=16, dropout=0.0)
    net = DiffusionRig(cfg).eval()
    with torch.no_grad():  # guided-diffusion zero-initialises output layers: give them weights so faces differ
        for param in net.parameters():
            if not bool(param.any()):
                param.normal_(0, 0.05)
    return net


@pytest.fixture(scope="module")
def faces():
    """Three different faces: photos, their buffers, codes, and two edited frames per face (face-major)."""
    g = torch.Generator().manual_seed(1)
    images = torch.rand(3, 3, SIZE, SIZE, generator=g) * 2 - 1
    source = torch.rand(3, 9, SIZE, SIZE, generator=g)
    codes = torch.randn(3, 64, generator=g)
    target = torch.rand(6, 9, SIZE, SIZE, generator=g)
    return images, source, codes, target


def test_each_face_of_a_batch_gives_what_it_gives_alone(model, faces):
    images, source, codes, target = faces
    batched = edit_faces(model, images, source, target, codes, steps=3, batch_size=4)  # chunks cross faces
    assert batched.shape == (6, 3, SIZE, SIZE) and batched.dtype == torch.float32
    for i in range(3):
        alone = edit_faces(model, images[i:i + 1], source[i:i + 1], target[2 * i:2 * i + 2], codes[i:i + 1], steps=3,
                           batch_size=1)
        torch.testing.assert_close(batched[2 * i:2 * i + 2], alone, atol=BATCH_ATOL, rtol=0)
    # the faces really differ (the old node sampled every face from the first face's inversion)
    assert (batched[0] - batched[2]).abs().mean() > 1e-2


def test_inversion_uses_each_faces_own_photo_buffers_and_code(model, faces):
    """The same edit written with the raw DDIM functions, one face at a time (an independent route)."""
    images, source, codes, target = faces
    out = edit_faces(model, images, source, target, codes, steps=3)
    for i in range(3):
        x_t = ddim_invert(model, images[i:i + 1], source[i:i + 1], codes[i:i + 1], steps=3)
        for k in range(2):
            row = 2 * i + k
            want = ddim_sample(model, target[row:row + 1], codes[i:i + 1], x_t, steps=3)
            torch.testing.assert_close(out[row:row + 1], want, atol=BATCH_ATOL, rtol=0)
    # a face's inversion is not another face's: swapping the photos changes the result
    swapped = edit_faces(model, images[[1, 0, 2]], source, target, codes, steps=3)
    assert (swapped[:2] - out[:2]).abs().mean() > 1e-2
    # one shared code is the same as that code given to every face
    shared = edit_faces(model, images, source, target, codes[:1], steps=3)
    torch.testing.assert_close(shared, edit_faces(model, images, source, target, codes[:1].expand(3, -1), steps=3),
                               atol=BATCH_ATOL, rtol=0)


def test_noise_start_shares_one_seeded_noise(model, faces):
    _, _, codes, target = faces
    out = edit_faces(model, None, None, target[:3], codes[:1], start="noise", steps=2, seed=7)
    noise = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7))
    want = ddim_sample(model, target[:3], codes[:1], noise, steps=2)
    torch.testing.assert_close(out, want, atol=BATCH_ATOL, rtol=0)
    other_seed = edit_faces(model, None, None, target[:3], codes[:1], start="noise", steps=2, seed=8)
    assert (other_seed - out).abs().mean() > 1e-2


def test_eta_noise_is_per_row_and_seeded(model, faces):
    images, source, codes, target = faces
    kwargs = dict(steps=3, eta=0.5, seed=3)
    batched = edit_faces(model, images, source, target, codes, batch_size=6, **kwargs)
    for i in range(3):
        alone = edit_faces(model, images[i:i + 1], source[i:i + 1], target[2 * i:2 * i + 2], codes[i:i + 1],
                           batch_size=1, **kwargs)
        torch.testing.assert_close(batched[2 * i:2 * i + 2], alone, atol=BATCH_ATOL, rtol=0)
    deterministic = edit_faces(model, images, source, target, codes, steps=3)
    assert (batched - deterministic).abs().mean() > 1e-3
    assert (edit_faces(model, images, source, target, codes, batch_size=6, steps=3, eta=0.5, seed=4)
            - batched).abs().mean() > 1e-3


def test_progress_counts_inversion_and_sampling_on_one_bar(model, faces, monkeypatch):
    """The progress protocol (core.progress): done is, at every call, the face-steps the UNet has run."""
    images, source, codes, target = faces
    rows, calls = [0], []
    original = model.denoise
    monkeypatch.setattr(model, "denoise", lambda x, *args: (rows.__setitem__(0, rows[0] + x.shape[0]),
                                                            original(x, *args))[1])
    edit_faces(model, images, source, target, codes, steps=3, batch_size=2,
               callback=lambda done, total, preview: calls.append((done, total, tuple(preview.shape), rows[0])))
    total = 3 * 3 + 6 * 3  # 3 faces inverted, 6 rows sampled, 3 steps each
    assert {c[1] for c in calls} == {total}
    assert [c[0] for c in calls] == [c[3] for c in calls]  # done = face-steps run so far
    assert [c[0] for c in calls] == sorted(c[0] for c in calls) and calls[-1][0] == total == rows[0]
    assert len(calls) == 2 * 3 + 3 * 3  # one call per step of each chunk (2 inversion chunks, 3 sampling)
    assert calls[0][2] == (3, SIZE, SIZE)
    noise_calls = []
    edit_faces(model, None, None, target, codes[:1], start="noise", steps=2,
               callback=lambda done, total, preview: noise_calls.append(total))
    assert set(noise_calls) == {6 * 2}


def test_a_callback_can_cancel(model, faces, monkeypatch):
    images, source, codes, target = faces
    denoised = []
    original = model.denoise
    monkeypatch.setattr(model, "denoise", lambda *args: (denoised.append(1), original(*args))[1])

    def cancel(done, total, **_):
        if done > 4:
            raise InterruptedError("cancelled")

    with pytest.raises(InterruptedError):
        edit_faces(model, images, source, target, codes, steps=3, callback=cancel)
    assert len(denoised) == 2  # 3 faces a step: the second step's report (6 face-steps) stopped it


@pytest.mark.parametrize("change, message", [
    (dict(steps=2.5), "steps must be a whole number"),
    (dict(steps=0), "steps must be a whole number"),
    (dict(batch_size=0), "batch_size must be a whole number"),
    (dict(eta=1.5), "eta must be between 0"),
    (dict(eta=math.nan), "eta must be between 0"),
    (dict(start="sideways"), "start must be 'inversion', 'noise' or an inverted start"),
])
def test_bad_settings_are_refused_before_any_work(model, faces, change, message):
    images, source, codes, target = faces
    kwargs = dict(steps=2) | change
    with pytest.raises(ValueError, match=message):
        edit_faces(model, images, source, target, codes, **kwargs)


def test_bad_shapes_say_what_to_do(model, faces):
    images, source, codes, target = faces
    with pytest.raises(ValueError, match="5 target buffers for 3 faces"):
        edit_faces(model, images, source, target[:5], codes, steps=1)
    with pytest.raises(ValueError, match="global codes have 32 values but this model uses 64"):
        edit_faces(model, images, source, target, codes[:, :32], steps=1)
    with pytest.raises(ValueError, match="non-empty"):
        edit_faces(model, images, source, target[:0], codes, steps=1)
    with pytest.raises(ValueError, match="3 source images but 2 source buffers"):
        edit_faces(model, images, source[:2], target, codes, steps=1)
    with pytest.raises(ValueError, match="codes has 2 rows for 3 faces"):
        edit_faces(model, images, source, target, codes[:2], steps=1)
    with pytest.raises(ValueError, match="needs the source images"):
        edit_faces(model, None, None, target, codes, steps=1)


def test_fast_samplers_keep_the_batch_rule_and_count_their_steps(model, faces):
    """dpmpp_2m (with its inversion) and the feature cache go through the same path: a batch equals its
    faces alone, the progress count matches the calls, and cache_interval 1 is exactly no cache."""
    images, source, codes, target = faces
    calls = []
    fast = edit_faces(model, images, source, target, codes, steps=4, batch_size=4, sampler="dpmpp_2m",
                      callback=lambda done, total, preview: calls.append((done, total)))
    assert calls[-1][0] == calls[-1][1] == 3 * 3 + 6 * 4  # dpmpp_2m inverts in steps - 1
    for i in range(3):
        alone = edit_faces(model, images[i:i + 1], source[i:i + 1], target[2 * i:2 * i + 2], codes[i:i + 1], steps=4,
                           batch_size=1, sampler="dpmpp_2m")
        # the second-order steps extrapolate from two model calls: the round-off tail grows ~1.5x (3 of 1536 > 1e-3)
        torch.testing.assert_close(fast[2 * i:2 * i + 2], alone, atol=2 * BATCH_ATOL, rtol=0)
    ddim = edit_faces(model, images, source, target, codes, steps=4)
    assert (fast - ddim).abs().mean() > 1e-4  # another sampler really ran
    assert torch.equal(edit_faces(model, images, source, target, codes, steps=4, cache_interval=1), ddim)
    cached = edit_faces(model, images, source, target, codes, steps=4, cache_interval=2)
    assert 1e-6 < float((cached - ddim).abs().mean()) < 0.5  # cached: close to, but not, the full evaluation
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        edit_faces(model, images, source, target, codes, steps=4, sampler="euler")
    with pytest.raises(ValueError, match="cache_interval must be a whole number"):
        edit_faces(model, images, source, target, codes, steps=4, cache_interval=0)


@pytest.mark.parametrize("settings", [
    dict(sampler="ddim", steps=3),
    dict(sampler="dpmpp_2m", steps=4),
    dict(sampler="dpmpp_2m", steps=3, eta=0.5, seed=9),  # eta and seed touch the sampling only
    dict(sampler="ddim", steps=3, cache_interval=2),
])
def test_an_edit_from_a_kept_inversion_is_the_one_call_edit_bit_for_bit(model, faces, settings):
    """3 faces x 2 frames, chunks of 2 rows crossing faces: inverting once and editing twice gives exactly
    what edit_faces gives when it inverts itself."""
    images, source, codes, target = faces
    schedule = {k: v for k, v in settings.items() if k in ("sampler", "steps", "cache_interval")}
    start = invert_faces(model, images, source, codes, batch_size=2, **schedule)
    assert isinstance(start, InvertedStart) and start.faces == 3
    assert start.x_t.shape == (3, 3, SIZE, SIZE) and start.x_t.dtype == torch.float32
    for buffers in (target, target.flip(0)):  # two edits from one inversion
        one_call = edit_faces(model, images, source, buffers, codes, batch_size=2, **settings)
        split = edit_faces(model, None, None, buffers, codes, start=start, batch_size=2, **settings)
        assert torch.equal(split, one_call)
    # the kept start is each face's own inversion (the raw inversion of face 1 alone, up to batch round-off)
    invert = ddim_invert if settings["sampler"] == "ddim" and "cache_interval" not in settings else None
    if invert is not None:
        alone = invert(model, images[1:2], source[1:2], codes[1:2], steps=settings["steps"])
        torch.testing.assert_close(start.x_t[1:2], alone, atol=BATCH_ATOL, rtol=0)


def test_a_start_made_otherwise_is_refused_with_what_to_change(model, faces):
    images, source, codes, target = faces
    start = invert_faces(model, images, source, codes, steps=3)

    def edit(on=model, **kwargs):
        return edit_faces(on, None, None, target, codes, start=start, **({"steps": 3} | kwargs))

    with pytest.raises(ValueError, match="made with sampler ddim, 3 steps, no feature cache, but this edit asks for "
                                         "sampler ddim, 4 steps"):
        edit(steps=4)
    with pytest.raises(ValueError, match="asks for sampler dpmpp_2m, 3 steps.*same sampler, steps and cache_interval"):
        edit(sampler="dpmpp_2m")
    with pytest.raises(ValueError, match="asks for sampler ddim, 3 steps, cache_interval 2"):
        edit(cache_interval=2)
    tuned = copy.deepcopy(model)  # a fine-tuned model: same config, other weights
    with torch.no_grad():
        tuned.denoisingUNet.out[-1].weight.add_(1e-3)
    with pytest.raises(ValueError, match=r"made with another model \(DiffusionRig 16 px float32 weights .*invert the "
                                         "faces again with this model"):
        edit(tuned)
    with pytest.raises(ValueError, match="another model .* than this edit's .*bfloat16"):
        edit(copy.deepcopy(model).to(torch.bfloat16))
    assert torch.equal(edit(copy.deepcopy(model)), edit())  # the same weights loaded again: the same model
    with pytest.raises(ValueError, match="pass images and source_buffers as None"):
        edit_faces(model, images, source, target, codes, start=start, steps=3)
    with pytest.raises(ValueError, match="5 target buffers for 3 faces"):
        edit_faces(model, None, None, target[:5], codes, start=start, steps=3)
    with pytest.raises(ValueError, match="inverted start is 16x16 px but the target buffers are 8x8"):
        edit_faces(model, None, None, target[:, :, :8, :8], codes, start=start, steps=3)


def test_the_inversion_alone_reports_progress_and_can_be_cancelled(model, faces, monkeypatch):
    images, source, codes, target = faces
    calls = []
    invert_faces(model, images, source, codes, steps=3, batch_size=2,
                 callback=lambda done, total, preview: calls.append((done, total, tuple(preview.shape))))
    assert [c[0] for c in calls] == [2, 4, 6, 7, 8, 9]  # chunks of 2 and 1 faces, 3 steps each
    assert {c[1] for c in calls} == {9} and calls[0][2] == (3, SIZE, SIZE)
    dpm = []
    start = invert_faces(model, images, source, codes, steps=4, sampler="dpmpp_2m",
                         callback=lambda done, total, preview: dpm.append((done, total)))
    assert dpm[-1] == (9, 9)  # dpmpp_2m inverts in steps - 1
    sampled = []
    edit_faces(model, None, None, target, codes, start=start, steps=4, sampler="dpmpp_2m",
               callback=lambda done, total, preview: sampled.append((done, total)))
    assert sampled[-1] == (6 * 4, 6 * 4)  # an edit from a kept start counts its sampling only

    denoised = []
    original = model.denoise
    monkeypatch.setattr(model, "denoise", lambda *args: (denoised.append(1), original(*args))[1])

    def cancel(done, total, preview):
        if done >= 4:
            raise InterruptedError("cancelled")

    with pytest.raises(InterruptedError):
        invert_faces(model, images, source, codes, steps=3, batch_size=2, callback=cancel)
    assert len(denoised) == 2  # stopped after the second step's call, not at the end of the inversion
