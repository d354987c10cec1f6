"""The one progress and cancel protocol of every library function that runs long.

A function that reports progress takes a callback (`callback`, or `progress` for the whole-job
runs of the demo and the video) and calls it as

    callback(done, total, **info)

after each unit of work it documents (a sampler step, the face-steps of a batch, a training
step, a photo). done counts the units finished so far: it rises, never falls, and reaches
total at the last call (of the run, or of its `stage`); total is the whole count, known at the
first call. info holds keyword fields, each function says which; a callback names the ones it
uses and takes the rest as `**_`:

- stage: str, the part of a longer job (the video's "track", "fit", "relight", "paste"; the
  demo's stages); done and total then count within the stage.
- preview: one image [3, H, W] in [-1, 1] to show (the current x0 estimate of a face, a
  training sample).
- x, x0: a sampler's current x_t and x0 estimate, [B, 3, H, W].
- loss, model: a training step's loss (float) and the model being trained.

Cancel: raise from the callback (ComfyUI's interrupt, KeyboardInterrupt, an exception of your
own). The function runs no further unit of work and lets the exception through; training first
checkpoints its last completed step.
"""

from __future__ import annotations

from typing import Any, Protocol


class Callback(Protocol):
    def __call__(self, done: int, total: int, **info: Any) -> None: ...


def notify(callback: Callback | None, done: int, total: int, **info: Any) -> None:
    """callback(done, total, **info), or nothing without a callback."""
    if callback is not None:
        callback(done, total, **info)


def in_stage(callback: Callback | None, stage: str) -> Callback | None:
    """The callback with stage=`stage` added to every call (None stays None)."""
    if callback is None:
        return None
    return lambda done, total, **info: callback(done, total, stage=stage, **info)


class Tally:
    """One count over several runs that call back per step (batches of faces, an inversion then the
    sampling): `steps(count)` is a sampler callback that adds `count` units per step to the tally and
    reports the sum to `callback` with the step's x0[0] as preview."""

    def __init__(self, callback: Callback | None, total: int, done: int = 0):
        self.callback, self.total, self.done = callback, total, done

    def steps(self, count: int) -> Callback:
        def step(done, total, x0=None, **_):
            self.done += count
            notify(self.callback, self.done, self.total, **({} if x0 is None else {"preview": x0[0]}))
        return step
