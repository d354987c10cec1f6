"""The pictures (docs/pictures/) and the workflow thumbnails (workflows/<name>.jpg): every workflow has its
thumbnail, every picture says what made it (the caption in its metadata, the same in docs/pictures/README.md),
the README opens with one of them, the graph drawings match their workflows, and the files stay small.
They are all written by tools/make_pictures.py (the README's links to them: tests/test_readme_links.py)."""

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from make_pictures import DEMO_WORKFLOW, THUMB_SIZE, graph_drawing, read_caption  # noqa: E402

PICTURES = ROOT / "docs" / "pictures"
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
PICTURE_FILES = sorted(p for p in PICTURES.iterdir() if p.suffix in (".png", ".gif", ".jpg", ".webp"))
THUMBNAILS = [w.with_suffix(".jpg") for w in WORKFLOWS]
MAX_PICTURE_KB, MAX_PICTURES_KB = 250, 700  # each picture, all of docs/pictures
MAX_THUMBNAIL_KB, MAX_THUMBNAILS_KB = 60, 400  # each thumbnail, all of them


def _index() -> dict[str, str]:
    """docs/pictures/README.md's table: {file: caption}."""
    rows = re.findall(r"^\| `([^`]+)` \| (.*) \|$", (PICTURES / "README.md").read_text(), re.M)
    return dict(rows)


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.stem)
def test_every_workflow_has_a_small_jpeg_thumbnail(workflow):
    thumbnail = workflow.with_suffix(".jpg")
    assert thumbnail.is_file(), f"{thumbnail.name} is missing: run python tools/make_pictures.py"
    with Image.open(thumbnail) as image:
        assert image.format == "JPEG" and image.size == THUMB_SIZE
    assert thumbnail.stat().st_size <= MAX_THUMBNAIL_KB * 1024


def test_no_thumbnail_without_its_workflow():
    assert {p.stem for p in (ROOT / "workflows").glob("*.jpg")} == {w.stem for w in WORKFLOWS}


@pytest.mark.parametrize("workflow", [w for w in WORKFLOWS if w.stem != DEMO_WORKFLOW], ids=lambda p: p.stem)
def test_graph_thumbnails_show_the_workflow_as_it_is(workflow):
    """A moved, added or removed node (or link) changes the drawing: the thumbnail must be drawn again."""
    drawn = np.asarray(graph_drawing(json.loads(workflow.read_text()), workflow.stem), dtype=np.int16)
    with Image.open(workflow.with_suffix(".jpg")) as image:
        saved = np.asarray(image.convert("RGB"), dtype=np.int16)
    differs = (np.abs(drawn - saved).max(axis=2) > 64).mean()  # JPEG's error stays far below 64 levels
    assert differs < 0.002, f"{workflow.with_suffix('.jpg').name} is not its graph: python tools/make_pictures.py"


def test_the_demo_workflows_thumbnail_is_its_output():
    caption = read_caption(ROOT / "workflows" / f"{DEMO_WORKFLOW}.jpg")
    assert "the workflow's own output" in caption and "SYNTHETIC" in caption


def test_graph_drawing_changes_when_a_node_moves():
    workflow = json.loads(WORKFLOWS[0].read_text())
    before = np.asarray(graph_drawing(workflow, "w"), dtype=np.int16)
    workflow["nodes"][-1]["pos"][1] += 200
    after = np.asarray(graph_drawing(workflow, "w"), dtype=np.int16)
    assert (np.abs(before - after).max(axis=2) > 64).mean() > 0.002


def test_every_picture_carries_its_caption_and_is_listed():
    index = _index()
    files = [str(p.relative_to(ROOT)) for p in [*PICTURE_FILES, *THUMBNAILS]]
    assert sorted(index) == sorted(files), "docs/pictures/README.md and the pictures differ: run make_pictures.py"
    for file in files:
        caption = read_caption(ROOT / file)
        assert caption and index[file] == caption, file
        assert "make_pictures.py" in caption, file  # names the command that makes it


def test_demo_pictures_say_the_person_is_synthetic():
    for file, caption in _index().items():
        if "demo's" in caption and "person" in caption:
            assert "SYNTHETIC" in caption, file


def test_pictures_stay_small():
    sizes = [p.stat().st_size for p in PICTURE_FILES]
    assert max(sizes) <= MAX_PICTURE_KB * 1024 and sum(sizes) <= MAX_PICTURES_KB * 1024, sizes
    assert sum(p.stat().st_size for p in THUMBNAILS) <= MAX_THUMBNAILS_KB * 1024


def test_readme_opens_with_a_picture():
    lines = [line for line in (ROOT / "README.md").read_text().splitlines() if line.strip()]
    assert lines[0].startswith("# ")
    picture = re.match(r"!\[[^\]]+\]\((docs/pictures/[^)]+)\)", lines[1])
    assert picture, "the README's first line after the title is not a picture"
    assert (ROOT / picture.group(1)).is_file() and picture.group(1) in _index()
