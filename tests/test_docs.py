"""The node help pages (web/docs/<NodeClassName>.md): one per node, up to date with the node classes, found where
ComfyUI's frontend looks for them (tools/make_docs.py writes them)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import nodes

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import make_docs  # noqa: E402
from make_docs import DocsError, build_all, stale_pages  # noqa: E402


@pytest.fixture(scope="module")
def pages():
    return build_all()


def test_every_node_has_an_up_to_date_page(pages):
    assert set(pages) == set(nodes.NODE_CLASS_MAPPINGS)
    assert stale_pages(pages) == [], "regenerate with: python tools/make_docs.py"


def _table(page: str, heading: str) -> dict[str, list[str]]:
    """The rows of the table under `## heading`: {first cell without backticks: the other cells}."""
    section = page.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [re.split(r"(?<!\\)\|", line)[1:-1] for line in section.splitlines() if line.startswith("| `")]
    return {cells[0].strip().split("`")[1]: [c.strip().replace("\\|", "|") for c in cells[1:]] for cells in rows}


@pytest.mark.parametrize("name", sorted(nodes.NODE_CLASS_MAPPINGS))
def test_the_page_says_what_the_node_declares(name):
    """Read back from the committed page, not from the generator: title, description, every input with its
    default and tooltip, every output with its type and tooltip, in the node's order."""
    cls, page = nodes.NODE_CLASS_MAPPINGS[name], (ROOT / "web" / "docs" / f"{name}.md").read_text()
    assert page.splitlines()[1] == f"# {nodes.NODE_DISPLAY_NAME_MAPPINGS[name]}"
    assert cls.DESCRIPTION.strip() in page
    inputs = _table(page, "Inputs")
    with make_docs.probe_folders() as folders:
        spec = make_docs.input_specs(cls, folders)
    declared = [(k, v) for section in ("required", "optional") for k, v in spec[section].items()]
    assert list(inputs) == [k for k, _ in declared]
    for key, entry in declared:
        options = entry[1]
        kind, default, tip = inputs[key]
        assert tip == options["tooltip"]
        if isinstance(entry[0], str):
            assert kind.startswith(entry[0])
        if "default" in options and not isinstance(options["default"], (bool, str)):
            assert float(default) == pytest.approx(float(options["default"]), rel=1e-6)
        if "min" in options:
            assert f"{make_docs._number(options['min'])} to {make_docs._number(options['max'])}" in kind
    outputs = _table(page, "Outputs")
    names = getattr(cls, "RETURN_NAMES", None)
    assert list(outputs) == list(names)
    assert [o[0] for o in outputs.values()] == list(cls.RETURN_TYPES)
    assert [o[1] for o in outputs.values()] == list(cls.OUTPUT_TOOLTIPS)
    for heading in ("Typical chain", "When it fails"):
        assert f"\n## {heading}\n" in page


def test_a_changed_input_makes_the_page_stale(monkeypatch):
    cls = nodes.NODE_CLASS_MAPPINGS["DiffusionRigRigSweep"]
    original = cls.INPUT_TYPES

    def more(klass=cls):
        spec = original()
        spec["required"]["wobble"] = ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "tooltip": "New knob."})
        return spec

    monkeypatch.setattr(cls, "INPUT_TYPES", classmethod(lambda klass: more()))
    pages = build_all()
    assert "| `wobble` | FLOAT, 0 to 1 | 0.5 | New knob. |" in pages["DiffusionRigRigSweep"]
    assert stale_pages(pages) == ["web/docs/DiffusionRigRigSweep.md is out of date"]


def test_a_changed_output_makes_the_page_stale(monkeypatch):
    cls = nodes.NODE_CLASS_MAPPINGS["DiffusionRigDECAFit"]
    monkeypatch.setattr(cls, "OUTPUT_TOOLTIPS", ("Something else.",))
    assert stale_pages(build_all()) == ["web/docs/DiffusionRigDECAFit.md is out of date"]


def test_a_node_without_prose_is_refused(monkeypatch):
    class NewNode:
        DESCRIPTION = "A node nobody documented yet."
        CATEGORY, FUNCTION, RETURN_TYPES, OUTPUT_TOOLTIPS = "DiffusionRig", "run", ("IMAGE",), ("A picture.",)

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {}}

    classes = {**nodes.NODE_CLASS_MAPPINGS, "DiffusionRigNew": NewNode}
    display = {**nodes.NODE_DISPLAY_NAME_MAPPINGS, "DiffusionRigNew": "New"}
    with pytest.raises(DocsError, match=r"DiffusionRigNew has no prose: write docs/node_help/DiffusionRigNew\.md"):
        build_all(classes=classes, display=display)


def test_a_page_of_a_removed_node_is_an_orphan(pages, tmp_path):
    for name, text in pages.items():
        (tmp_path / f"{name}.md").write_text(text)
    (tmp_path / "DiffusionRigGone.md").write_text("old")
    (tmp_path / "DiffusionRigRelight.md").unlink()
    assert stale_pages(pages, tmp_path) == [f"{tmp_path}/DiffusionRigRelight.md is missing",
                                            f"{tmp_path}/DiffusionRigGone.md documents no node of the pack"]


@pytest.mark.parametrize("prose, said", [
    ("## Typical chain\n\nLoad Face Photo → Frobnicate → **Relight**\n\n## When it fails\n\nx\n", "'Frobnicate'"),
    ("## Typical chain\n\nDECA Fit → Render Buffers\n\n## When it fails\n\nx\n", "does not name the node itself"),
    ("## Typical chain\n\nDECA Fit → **Relight**\n", "missing or empty section(s) ## When it fails"),
    ("## Typical chain\n\nDECA Fit → **Relight**\n\n## When it fails\n\nx\n\n## Trivia\n\ny\n", "unknown section"),
    ("# Relight\n\n## Typical chain\n\nDECA Fit → **Relight**\n\n## When it fails\n\nx\n", "only '## <section>'"),
])
def test_broken_prose_is_refused(prose, said, tmp_path, monkeypatch):
    (tmp_path / "DiffusionRigRelight.md").write_text(prose)
    monkeypatch.setattr(make_docs, "ROOT", tmp_path)
    with pytest.raises(DocsError) as caught:
        make_docs.read_prose("DiffusionRigRelight", nodes.NODE_DISPLAY_NAME_MAPPINGS, tmp_path)
    assert said in str(caught.value)


def test_chain_steps_keep_names_with_brackets():
    display = set(nodes.NODE_DISPLAY_NAME_MAPPINGS.values()) | set(make_docs.CORE_NODES)
    steps = make_docs.chain_steps("Load Image (a batch, or the `folder` input) → **Build Face Album** → "
                                  "Train DiffusionRig (personalize) → Upscale Image (using Model) or Save Image")
    assert steps == ["Load Image (a batch, or the `folder` input)", "Build Face Album",
                     "Train DiffusionRig (personalize)", "Upscale Image (using Model)", "Save Image"]
    assert all(make_docs.known_step(s, display) for s in steps)
    assert not make_docs.known_step("Relight Image", display)


def test_file_choices_are_described_not_listed(pages):
    """Combos of the user's files (models, photos) do not list whatever files the generating machine had."""
    assert "| `ckpt_name` | file choice |" in pages["DiffusionRigLoadModel"]
    assert "| `lora_name` (optional) | file choice (or `none`) | `none` |" in pages["DiffusionRigLoadModel"]
    assert "| `image` | file choice, with an upload button |" in pages["DiffusionRigLoadPhoto"]
    assert "astronaut" not in pages["DiffusionRigLoadPhoto"].split("## Inputs")[1].split("## Outputs")[0]
    assert "choice: `sliders`, `preset`, `rotate fitted light`, `copy reference`" in pages["DiffusionRigRelight"]


def test_comfyui_finds_the_pages_where_its_frontend_looks():
    """Load the pack as ComfyUI's load_custom_node does (a module named after its folder, from __init__.py), read
    WEB_DIRECTORY as ComfyUI does, and find /extensions/<folder>/docs/<NodeClassName>.md, the frontend's fallback
    after <NodeClassName>/<locale>.md, for every registered node."""
    code = f"""
import importlib.util, json, os, sys
root = {str(ROOT)!r}
spec = importlib.util.spec_from_file_location("comfy-diffusionrig", os.path.join(root, "__init__.py"))
module = importlib.util.module_from_spec(spec)
sys.modules["comfy-diffusionrig"] = module
spec.loader.exec_module(module)
web = os.path.abspath(os.path.join(root, getattr(module, "WEB_DIRECTORY")))
print(json.dumps({{"web": web, "nodes": sorted(module.NODE_CLASS_MAPPINGS),
                   "missing": [n for n in module.NODE_CLASS_MAPPINGS
                               if not os.path.isfile(os.path.join(web, "docs", n + ".md"))]}}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.splitlines()[-1])
    assert found["web"] == str(ROOT / "web") and found["nodes"] == sorted(nodes.NODE_CLASS_MAPPINGS)
    assert found["missing"] == []
