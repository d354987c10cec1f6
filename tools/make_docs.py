"""Write the node help pages that ComfyUI's node library shows: web/docs/<NodeClassName>.md, one per node.

    python tools/make_docs.py          # rewrites web/docs/*.md (and removes pages of nodes that are gone)
    python tools/make_docs.py --check  # changes nothing; names the pages that are missing or out of date

A page is built from two sources, so that the generated part cannot drift from the code and the
hand-written part is never lost when the pages are generated again:
- the node class: display name, category, DESCRIPTION, INPUT_TYPES (type, default, range, tooltip),
  RETURN_TYPES / RETURN_NAMES / OUTPUT_TOOLTIPS, which of the pack's nodes give or take each of its
  sockets, and which shipped workflows (workflows/*.json) use it;
- docs/node_help/<NodeClassName>.md, the prose: an optional paragraph before the first section, then
  the sections "## Typical chain" and "## When it fails" (both required) and an optional "## Tips".
  In the typical chain, a line of "A → B → **This node**" names nodes by their display names; names
  that are neither ours nor in CORE_NODES are refused (a renamed node cannot leave a stale chain).

ComfyUI's frontend fetches /extensions/<pack folder>/docs/<NodeClassName>/<locale>.md, then
/extensions/<pack folder>/docs/<NodeClassName>.md, from the pack's WEB_DIRECTORY (the root
__init__.py sets it to ./web). tests/test_docs.py checks that every page is what this script writes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PAGES = ROOT / "web" / "docs"
PROSE = ROOT / "docs" / "node_help"
WORKFLOWS = ROOT / "workflows"
SECTIONS = ("Typical chain", "When it fails", "Tips")
REQUIRED = ("Typical chain", "When it fails")
# core ComfyUI nodes a typical chain may name (display names as ComfyUI shows them)
CORE_NODES = ("Load Image", "Save Image", "Preview Image", "Upscale Image (using Model)", "Load Upscale Model",
              "Upscale Image By", "Repeat Image Batch", "Load Video", "Video Combine", "Apply ControlNet",
              "Load ControlNet Model", "VAE Encode (for Inpainting)")
# file suffixes the pack's file combos read (a probe file of each shows which combos list files)
FILE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".hdr", ".pic", ".exr",
                 ".json", ".tar", ".pt", ".pth", ".ckpt", ".safetensors")
ARROW = "→"


class DocsError(ValueError):
    """A node or its prose cannot make a page (says which file to fix)."""


def _node_tables():
    """(class mappings, display names) of the pack, as ComfyUI registers them."""
    import nodes

    return nodes.NODE_CLASS_MAPPINGS, nodes.NODE_DISPLAY_NAME_MAPPINGS


def _specs_with_folders(cls, root: Path) -> dict[str, dict[str, tuple]]:
    """INPUT_TYPES() of a node class with the model and input folders at root: {"required": ..., "optional": ...}."""
    saved = {k: os.environ.get(k) for k in ("COMFY_DIFFUSIONRIG_MODELS", "COMFY_DIFFUSIONRIG_INPUT")}
    os.environ["COMFY_DIFFUSIONRIG_MODELS"] = str(root / "models")
    os.environ["COMFY_DIFFUSIONRIG_INPUT"] = str(root / "input")
    try:
        spec = cls.INPUT_TYPES()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return {section: spec.get(section, {}) for section in ("required", "optional")}


@contextlib.contextmanager
def probe_folders():
    """(empty, full): model and input folders with no file, and with a file of every suffix the pack reads in
    every model folder and in the input folder (see `input_specs`)."""
    from nodes.host import MODEL_FOLDERS

    with tempfile.TemporaryDirectory() as empty, tempfile.TemporaryDirectory() as full:
        for folder in [Path(full) / "input"] + [Path(full) / "models" / name for name in MODEL_FOLDERS]:
            folder.mkdir(parents=True)
            for suffix in FILE_SUFFIXES:
                (folder / f"probe{suffix}").write_bytes(b"")
        yield Path(empty), Path(full)


def input_specs(cls, folders: tuple[Path, Path]) -> dict[str, dict[str, tuple]]:
    """INPUT_TYPES() of a node class, called with the empty model and input folders of `probe_folders` (whoever
    generates the pages, on whatever machine, gets the same page), each combo that lists files marked: its
    spec's options gain "files": True. A combo lists files when it grows once the folders hold files."""
    bare, probed = _specs_with_folders(cls, folders[0]), _specs_with_folders(cls, folders[1])
    for section, entries in bare.items():
        for key, spec in entries.items():
            if isinstance(spec[0], list) and spec[0] != probed[section][key][0]:
                entries[key] = (spec[0], {**(spec[1] if len(spec) > 1 else {}), "files": True})
    return bare


def _number(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _is_file(choice) -> bool:
    return isinstance(choice, str) and choice.lower().endswith(FILE_SUFFIXES)


def describe_type(kind, options: dict) -> str:
    """The type column: the socket type, a number's range and step, or a combo's choices (a list of files is
    described, not listed: its entries are the user's files)."""
    if isinstance(kind, (list, tuple)):
        if options.get("files"):
            fixed = [c for c in kind if not _is_file(c)]
            upload = ", with an upload button" if options.get("image_upload") else ""
            return "file choice" + upload + (f" (or {', '.join(f'`{c}`' for c in fixed)})" if fixed else "")
        return "choice: " + ", ".join(f"`{c}`" for c in kind)
    if kind in ("INT", "FLOAT") and "min" in options and "max" in options:
        step = f", step {_number(options['step'])}" if "step" in options else ""
        return f"{kind}, {_number(options['min'])} to {_number(options['max'])}{step}"
    return kind


def describe_default(options: dict) -> str:
    if "default" not in options:
        return ""
    value = options["default"]
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, str):
        return f"`{value}`" if value else "(empty)"
    return _number(value)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def chain_steps(line: str) -> list[str]:
    """The steps of a chain line "A → B (remark) → **C** or D": ["A", "B (remark)", "C", "D"]; [] without →."""
    if ARROW not in line:
        return []
    return [part.strip() for step in line.split(ARROW) for part in re.split(r" (?:or|and) (?![^(]*\))", step.replace("*", ""))
            if part.strip()]


def known_step(step: str, known: set[str]) -> bool:
    """A node name, a node name followed by a remark in brackets ("Load Image (a batch)"), or "…" (nodes left out)."""
    return step == "…" or step in known or re.sub(r"\s*\([^()]*\)$", "", step) in known


def read_prose(name: str, display: dict[str, str], folder: Path = PROSE) -> dict[str, str]:
    """docs/node_help/<name>.md split into {"": intro, "Typical chain": ..., ...}, checked."""
    path = folder / f"{name}.md"
    if not path.is_file():
        raise DocsError(f"node {name} has no prose: write {path.relative_to(ROOT)} with the sections "
                        f"{', '.join('## ' + s for s in REQUIRED)} (see tools/make_docs.py)")
    parts, current = {"": []}, ""
    for line in path.read_text().splitlines():
        heading = re.match(r"^## (.+?)\s*$", line)
        if heading:
            current = heading.group(1)
            if current not in SECTIONS:
                raise DocsError(f"{path.relative_to(ROOT)}: unknown section '## {current}'; use {', '.join(SECTIONS)}")
            if current in parts:
                raise DocsError(f"{path.relative_to(ROOT)}: section '## {current}' appears twice")
            parts[current] = []
        elif line.startswith("#"):
            raise DocsError(f"{path.relative_to(ROOT)}: only '## <section>' headings belong in the prose "
                            f"(the page's title comes from the node), found {line!r}")
        else:
            parts[current].append(line)
    prose = {key: "\n".join(lines).strip() for key, lines in parts.items()}
    missing = [s for s in REQUIRED if not prose.get(s)]
    if missing:
        raise DocsError(f"{path.relative_to(ROOT)}: missing or empty section(s) {', '.join('## ' + s for s in missing)}")
    known = set(display.values()) | set(CORE_NODES)
    for line in prose["Typical chain"].splitlines():
        for step in chain_steps(line):
            if not known_step(step, known):
                raise DocsError(f"{path.relative_to(ROOT)}: the typical chain names {step!r}, which is neither a "
                                "node of this pack (display name) nor in make_docs.CORE_NODES")
    if display[name] not in prose["Typical chain"]:
        raise DocsError(f"{path.relative_to(ROOT)}: the typical chain does not name the node itself "
                        f"({display[name]!r})")
    return prose


def workflow_uses(folder: Path = WORKFLOWS) -> dict[str, list[str]]:
    """Node class name -> the shipped workflows (file names) that use it."""
    uses: dict[str, list[str]] = {}
    for path in sorted(folder.glob("*.json")):
        for kind in sorted({n["type"] for n in json.loads(path.read_text())["nodes"]}):
            uses.setdefault(kind, []).append(path.name)
    return uses


def _socket_partners(classes, display, specs) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """For each socket type of the pack (not core ComfyUI types): the nodes that output it, and that take it."""
    makers: dict[str, list[str]] = {}
    takers: dict[str, list[str]] = {}
    for name, cls in classes.items():
        for kind in dict.fromkeys(cls.RETURN_TYPES):
            makers.setdefault(kind, []).append(display[name])
        for section in specs[name].values():
            for spec in section.values():
                if isinstance(spec[0], str):
                    takers.setdefault(spec[0], [])
                    if display[name] not in takers[spec[0]]:
                        takers[spec[0]].append(display[name])
    return makers, takers


CORE_TYPES = {"IMAGE", "MASK", "INT", "FLOAT", "STRING", "BOOLEAN"}


def render_page(name: str, cls, display: dict[str, str], prose: dict[str, str], specs, makers, takers,
                uses: dict[str, list[str]]) -> str:
    """The markdown help page of one node."""
    source = Path(sys.modules[cls.__module__].__file__).relative_to(ROOT).as_posix()
    lines = [f"<!-- Generated by tools/make_docs.py from {source} ({cls.__name__}) and docs/node_help/{name}.md: "
             "edit those and run python tools/make_docs.py, not this file. -->",
             f"# {display[name]}", "",
             f"Category **{cls.CATEGORY}** · node id `{name}`" + (" · output node" if getattr(cls, "OUTPUT_NODE",
                                                                                             False) else ""),
             "", cls.DESCRIPTION.strip(), ""]
    if prose.get(""):
        lines += [prose[""], ""]
    lines += ["## Inputs", ""]
    rows = [(section, key, spec) for section in ("required", "optional") for key, spec in specs[section].items()]
    if rows:
        lines += ["| input | type | default | what it does |", "| --- | --- | --- | --- |"]
        for section, key, spec in rows:
            options = spec[1] if len(spec) > 1 else {}
            label = f"`{key}`" + (" (optional)" if section == "optional" else "")
            lines.append(f"| {label} | {_cell(describe_type(spec[0], options))} | "
                         f"{_cell(describe_default(options))} | {_cell(options.get('tooltip', ''))} |")
        lines.append("")
        own = [spec[0] for _, _, spec in rows if isinstance(spec[0], str) and spec[0] not in CORE_TYPES]
        for kind in dict.fromkeys(own):
            lines.append(f"- `{kind}` comes from: {', '.join(makers.get(kind, [])) or 'no node of this pack'}.")
        if own:
            lines.append("")
    else:
        lines += ["None.", ""]
    names = getattr(cls, "RETURN_NAMES", None) or tuple(k.lower() for k in cls.RETURN_TYPES)
    lines += ["## Outputs", "", "| output | type | what it is |", "| --- | --- | --- |"]
    for out_name, kind, tip in zip(names, cls.RETURN_TYPES, cls.OUTPUT_TOOLTIPS):
        lines.append(f"| `{out_name}` | {kind} | {_cell(tip)} |")
    lines.append("")
    for kind in dict.fromkeys(k for k in cls.RETURN_TYPES if k not in CORE_TYPES):
        lines.append(f"- `{kind}` goes to: {', '.join(takers.get(kind, [])) or 'no node of this pack'}.")
    if any(k not in CORE_TYPES for k in cls.RETURN_TYPES):
        lines.append("")
    lines += ["## Typical chain", "", prose["Typical chain"], ""]
    shipped = uses.get(name, [])
    lines += ["Shipped workflows that use it (the pack's `workflows/` folder, also in ComfyUI's template "
              "browser): " + (", ".join(f"`{w}`" for w in shipped) if shipped else "none yet") + ".", ""]
    lines += ["## When it fails", "", prose["When it fails"], ""]
    if prose.get("Tips"):
        lines += ["## Tips", "", prose["Tips"], ""]
    return "\n".join(lines).rstrip() + "\n"


def build_all(prose_dir: Path = PROSE, workflows: Path = WORKFLOWS, classes=None, display=None) -> dict[str, str]:
    """{NodeClassName: page text} for every node of the pack."""
    if classes is None:
        classes, display = _node_tables()
    missing = [n for n in classes if n not in display]
    if missing:
        raise DocsError(f"nodes without a display name: {', '.join(missing)}")
    with probe_folders() as folders:
        specs = {name: input_specs(cls, folders) for name, cls in classes.items()}
    makers, takers = _socket_partners(classes, display, specs)
    uses = workflow_uses(workflows)
    return {name: render_page(name, cls, display, read_prose(name, display, prose_dir), specs[name], makers, takers,
                              uses) for name, cls in classes.items()}


def _shown(path: Path) -> str:
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)


def stale_pages(pages: dict[str, str], folder: Path = PAGES) -> list[str]:
    """What differs between `pages` and folder/: missing, out-of-date and orphaned pages, one line each."""
    problems = []
    for name, text in pages.items():
        path = folder / f"{name}.md"
        if not path.is_file():
            problems.append(f"{_shown(path)} is missing")
        elif path.read_text() != text:
            problems.append(f"{_shown(path)} is out of date")
    for path in sorted(folder.glob("*.md")) if folder.is_dir() else []:
        if path.stem not in pages:
            problems.append(f"{_shown(path)} documents no node of the pack")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when a page is missing or stale")
    args = parser.parse_args(argv)
    pages = build_all()
    if args.check:
        problems = stale_pages(pages)
        for line in problems:
            print(line)
        if problems:
            print("regenerate with: python tools/make_docs.py")
        return 1 if problems else 0
    PAGES.mkdir(parents=True, exist_ok=True)
    for path in PAGES.glob("*.md"):
        if path.stem not in pages:
            path.unlink()
            print(f"removed {path.relative_to(ROOT)}")
    for name, text in pages.items():
        path = PAGES / f"{name}.md"
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
            print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
