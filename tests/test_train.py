"""The train command under torchrun: two gloo processes equal one, a killed rank, a clean stop.

A 16 px model without dropout on an 8-face dataset, fp32 on the CPU. Two processes with a
global batch of 4 (2 per rank) are compared with one process that splits the same batch into
grad_accum=2 micro-batches of the same 2 faces: the encoder's batch statistics then see the same
faces, DDP averages (g0 + g1) / 2 and the single process sums g0 / 2 + g1 / 2, and halving is
exact in floating point, so the weights must agree bit for bit (tolerance 0).
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from comfy_diffusionrig import load_diffusionrig
from comfy_diffusionrig.model.checkpoints import save_diffusionrig
from comfy_diffusionrig.train.dataset import DatasetError, load_dataset, write_dataset
from comfy_diffusionrig.model.unet import DiffusionRig, UNetConfig

TINY = UNetConfig(image_size=16, num_channels=32, num_res_blocks=1, channel_mult=(1, 2), attention_resolutions=(8,),
                  num_head_channels=16, dropout=0.0)
ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--stage", "2", "--lr", "1e-3", "--batch", "4", "--precision", "fp32"]


@pytest.fixture(scope="module")
def run_inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    torch.manual_seed(0)
    save_diffusionrig(DiffusionRig(TINY), folder / "tiny.safetensors")
    g = torch.Generator().manual_seed(1)
    images = torch.nn.functional.interpolate(torch.rand(8, 3, 4, 4, generator=g) * 2 - 1, size=16, mode="bilinear")
    write_dataset(folder / "data", images, torch.rand(8, 9, 16, 16, generator=g), shard_size=3)
    return ["--data", str(folder / "data"), "--init", str(folder / "tiny.safetensors")]


def command(processes: int, run_inputs: list[str], out: Path, *extra: str) -> list[str]:
    launcher = [sys.executable, "-m", "comfy_diffusionrig.train"] if processes == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
         "-m", "comfy_diffusionrig.train"]
    return [*launcher, *run_inputs, *COMMON, "--out", str(out), *extra]


def environment() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def run(processes: int, run_inputs: list[str], out: Path, *extra: str) -> subprocess.CompletedProcess:
    done = subprocess.run(command(processes, run_inputs, out, *extra), env=environment(), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def parameters(path: Path) -> dict[str, torch.Tensor]:
    """The trained tensors; BatchNorm running statistics are rank 0's under DDP and are left out."""
    state = torch.load(path, weights_only=True)
    state = state.get("model", state)
    return {k: v for k, v in state.items() if "running_" not in k and "num_batches" not in k}


def assert_equal(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, first {different[:3]}"


def losses(out: Path) -> list[str]:
    return (out / "loss.csv").read_text().splitlines()


def test_two_processes_train_the_same_weights_as_one(tmp_path, run_inputs):
    run(2, run_inputs, tmp_path / "two", "--steps", "3")
    run(1, run_inputs, tmp_path / "one", "--steps", "3", "--grad-accum", "2")
    two, one = parameters(tmp_path / "two" / "model.pt"), parameters(tmp_path / "one" / "model.pt")
    assert_equal(two, one)
    assert losses(tmp_path / "two") == losses(tmp_path / "one") and len(losses(tmp_path / "one")) == 4
    torch.manual_seed(0)  # the initial weights, as the fixture made them
    initial = {k: v for k, v in DiffusionRig(TINY).state_dict().items() if k in two}
    moved = max(float((two[k] - initial[k]).abs().max()) for k in two)
    assert moved > 1e-3  # three Adam steps at lr 1e-3 moved the weights (the comparison is not vacuous)
    # one process over the whole batch at once is another trajectory (batch statistics over 4 faces)
    run(1, run_inputs, tmp_path / "whole", "--steps", "3")
    assert not all(torch.equal(two[k], v) for k, v in parameters(tmp_path / "whole" / "model.pt").items())
    # the exports: official .pt layout key for key, and safetensors with the config
    loaded_pt = load_diffusionrig(tmp_path / "two" / "model.pt", config=TINY)
    loaded_st = load_diffusionrig(tmp_path / "two" / "model.safetensors")
    assert loaded_st.config == TINY
    assert_equal({k: v for k, v in loaded_pt.state_dict().items() if k in two}, two)
    assert_equal({k: v for k, v in loaded_st.state_dict().items() if k in two}, two)
    assert len(torch.load(tmp_path / "two" / "train.pt", weights_only=True)["rng"]["ranks"]) == 2


def workers(launcher: subprocess.Popen) -> list[int]:
    children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
    return [int(pid) for pid in children
            if b"comfy_diffusionrig.train" in Path(f"/proc/{pid}/cmdline").read_bytes()]


def wait_for_step(path: Path, step: int, launcher: subprocess.Popen) -> int:
    deadline = time.time() + 90
    while time.time() < deadline and launcher.poll() is None:
        if path.exists():
            done = torch.load(path, weights_only=True)["step"]
            if done >= step:
                return done
        time.sleep(0.1)
    raise AssertionError(f"no checkpoint of step {step} (launcher exit code {launcher.poll()})")


def test_killed_rank_leaves_a_whole_checkpoint_that_resumes_on_one_process(tmp_path, run_inputs):
    out, steps = tmp_path / "killed", "12"
    launcher = subprocess.Popen(command(2, run_inputs, out, "--steps", steps, "--checkpoint-every", "1"),
                                env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_step(out / "train.pt", 2, launcher)
        os.kill(workers(launcher)[1], signal.SIGKILL)
        assert launcher.wait(timeout=60) != 0
    finally:
        launcher.kill()
    state = torch.load(out / "train.pt", weights_only=True)  # whole: it loads, and its parts agree
    assert 2 <= state["step"] < 12 and len(state["losses"]) == state["step"]
    assert len(state["rng"]["ranks"]) == 2
    run(1, run_inputs, out, "--steps", steps, "--checkpoint-every", "1", "--grad-accum", "2")
    run(1, run_inputs, tmp_path / "reference", "--steps", steps, "--grad-accum", "2")
    assert_equal(parameters(out / "model.pt"), parameters(tmp_path / "reference" / "model.pt"))
    assert [line.split(",")[0] for line in losses(out)] == ["step", *map(str, range(1, 13))]


def test_sigterm_stops_every_rank_after_a_checkpoint(tmp_path, run_inputs):
    out = tmp_path / "stopped"
    launcher = subprocess.Popen(command(2, run_inputs, out, "--steps", "200", "--checkpoint-every", "100"),
                                env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while launcher.poll() is None and not (out / "loss.csv").exists():
            time.sleep(0.1)
        time.sleep(1)
        launcher.send_signal(signal.SIGTERM)  # torchrun passes it on to both ranks
        _, stderr = launcher.communicate(timeout=60)
    finally:
        launcher.kill()
    state = torch.load(out / "train.pt", weights_only=True)
    assert 1 <= state["step"] < 100, stderr[-2000:]  # written by the stop, not by the periodic checkpoint
    assert "stopped by signal 15" in stderr
    assert len(losses(out)) - 1 == state["step"]  # the log and the checkpoint agree
    assert not (out / "model.pt").exists()


def test_dataset_round_trip_and_errors(tmp_path):
    g = torch.Generator().manual_seed(3)
    images, buffers = torch.rand(5, 3, 16, 16, generator=g) * 2 - 1, torch.rand(5, 9, 16, 16, generator=g)
    write_dataset(tmp_path / "data", images, buffers, shard_size=2)
    data = load_dataset(tmp_path / "data")
    assert (data.images.dtype, data.buffers.dtype) == (torch.uint8, torch.float16)  # converted per batch
    images_back, buffers_back = data.batch(torch.arange(5), torch.device("cpu"))
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [
        "index.json", "shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"]
    # uint8 storage: at most half a grey level (1 / 255 in [-1, 1] units); buffers fp16 (rel. 2^-11)
    assert float((images_back - images).abs().max()) <= 1 / 255 + 1e-6
    assert torch.allclose(buffers_back, buffers, rtol=2 ** -11, atol=0)
    with pytest.raises(DatasetError, match="has no index.json.*prepare-data"):
        load_dataset(tmp_path)
    (tmp_path / "data" / "shard-00001.safetensors").write_bytes(b"broken")
    with pytest.raises(DatasetError, match="shard-00001.safetensors.*run prepare-data again"):
        load_dataset(tmp_path / "data")


def test_cli_train_from_scratch_and_stage_two_needs_a_model(tmp_path, run_inputs, capsys):
    from comfy_diffusionrig.cli import main

    config = tmp_path / "tiny.json"  # official create_model_and_diffusion kwargs
    config.write_text('{"image_size": 16, "num_channels": 32, "num_res_blocks": 1, "channel_mult": "1,2", '
                      '"attention_resolutions": "8", "num_head_channels": 16, "dropout": 0.0}')
    assert main(["train", "--data", run_inputs[1], "--stage", "1", "--config", str(config), "--out",
                 str(tmp_path / "s1"), "--steps", "2", "--batch", "2", "--precision", "fp32"]) == 0
    state = torch.load(tmp_path / "s1" / "train.pt", weights_only=True)
    assert state["train_config"]["lr"] == 1e-4 and state["train_config"]["train_encoder"]  # official stage 1
    assert load_diffusionrig(tmp_path / "s1" / "model.safetensors").config.num_channels == 32
    assert main(["train", "--data", run_inputs[1], "--stage", "2", "--out", str(tmp_path / "s2")]) == 2
    assert "stage 2 fine-tunes a trained model: pass --init" in capsys.readouterr().err
