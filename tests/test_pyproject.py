"""pyproject.toml against the Comfy registry's rules that can be checked offline.

The rules: the registry's pyproject specification (docs.comfy.org/registry/specifications: name, semantic
version, licence, urls, classifiers, [tool.comfy] PublisherId / DisplayName / Icon / requires-comfyui) and
what comfy-cli's `comfy node publish` reads and checks before it uploads (registry/config_parser.py: OS and
accelerator classifiers, the requires-comfyui pattern, a string licence read as its text; and its ruff
security check S102/S307/E702: no exec, no eval, no two statements on one line). setuptools validates the
[project] table itself (its bundled validate-pyproject), with its deprecation warnings turned into errors.
"""

import ast
import re
import subprocess
import tokenize
import tomllib
import warnings
from pathlib import Path
from urllib.parse import urlparse

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT, COMFY = PYPROJECT["project"], PYPROJECT["tool"]["comfy"]

# the registry's node id: < 100 characters, letters, digits, '-', '_', '.'; starts with a letter; no two
# special characters in a row
NODE_ID = re.compile(r"^[A-Za-z][A-Za-z0-9]*(?:[-_.][A-Za-z0-9]+)*$")
SEMVER = re.compile(r"^\d+\.\d+\.\d+$")
# comfy-cli validate_version: each comma-separated part is [operator]major.minor.patch[-suffix]
VERSION_PART = re.compile(r"^(?:(==|>=|<=|!=|~=|>|<|<>|=)\s*)?(\d+\.\d+\.\d+(?:-[a-zA-Z0-9]+)?)?$")
OS_PREFIXES = ("Microsoft", "POSIX", "MacOS", "OS Independent")  # comfy-cli's valid OS classifier values
ACCELERATORS = {"GPU :: NVIDIA CUDA", "GPU :: AMD ROCm", "GPU :: Intel Arc", "NPU :: Huawei Ascend",
                "GPU :: Apple Metal"}
ICON_TYPES = {".svg", ".png", ".jpg", ".jpeg", ".gif"}
ICON_MAX = (800, 400)  # the specification's maximum resolution (width x height)


def test_name_is_a_valid_node_id():
    name = PROJECT["name"]
    assert len(name) < 100 and NODE_ID.match(name), name
    assert "comfyui" not in name.lower()  # the specification's advice


def test_version_is_semver():
    assert SEMVER.match(PROJECT["version"]), PROJECT["version"]


def test_setuptools_accepts_the_project_table_without_deprecation_warnings(monkeypatch):
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    monkeypatch.chdir(ROOT)  # license-files are found from the project folder
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a licence table warns, License classifiers beside SPDX fail (setuptools >= 77)
        distribution = apply_configuration(Distribution(), ROOT / "pyproject.toml")
    assert distribution.metadata.name == PROJECT["name"] and distribution.metadata.license_expression == "MIT"


def test_licence_is_an_spdx_expression_with_its_file():
    # the registry reads a string licence as its text (comfy-cli); setuptools >= 77 deprecates the table forms
    assert PROJECT["license"] == "MIT"
    assert PROJECT["license-files"] == ["LICENSE"]
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    assert not [c for c in PROJECT.get("classifiers", []) if c.startswith("License ::")]  # refused beside SPDX


def test_classifiers_follow_the_registrys_rules():
    classifiers = PROJECT["classifiers"]
    operating_systems = [c.removeprefix("Operating System :: ") for c in classifiers
                         if c.startswith("Operating System :: ")]
    assert operating_systems and all(o.startswith(OS_PREFIXES) for o in operating_systems)
    accelerators = [c.removeprefix("Environment :: ") for c in classifiers if c.startswith("Environment ::")]
    assert set(accelerators) <= ACCELERATORS
    assert all(" :: " in c for c in classifiers)


def test_urls_point_to_the_repository():
    urls = PROJECT["urls"]
    repository = urls["Repository"]
    parsed = urlparse(repository)
    assert parsed.scheme == "https" and parsed.netloc == "github.com" and len(parsed.path.strip("/").split("/")) == 2
    assert urls["Bug Tracker"] == urls["Issues"] == repository + "/issues"  # the spec's key and comfy-cli's
    assert urls["Documentation"].startswith(repository)
    assert all(urlparse(u).scheme == "https" for u in urls.values())


def test_tool_comfy_fields():
    assert re.match(r"^[a-z][a-z0-9-]*$", COMFY["PublisherId"]), COMFY["PublisherId"]
    assert COMFY["DisplayName"].strip()
    for part in COMFY["requires-comfyui"].split(","):
        assert VERSION_PART.match(part.strip()), COMFY["requires-comfyui"]
    assert PROJECT["requires-python"].startswith(">=")


def test_icon_is_the_repositorys_own_file_on_main():
    owner_repo = urlparse(PROJECT["urls"]["Repository"]).path.strip("/")
    prefix = f"https://raw.githubusercontent.com/{owner_repo}/main/"
    assert COMFY["Icon"].startswith(prefix), COMFY["Icon"]
    path = ROOT / COMFY["Icon"].removeprefix(prefix)
    assert path.is_file(), f"{path} (the registry icon) is missing: python tools/make_pictures.py writes it"
    assert path.suffix in ICON_TYPES
    if path.suffix != ".svg":
        with Image.open(path) as icon:
            assert icon.width <= ICON_MAX[0] and icon.height <= ICON_MAX[1]


def _python_files():
    listed = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True)
    files = [ROOT / f for f in listed.stdout.split()] if listed.returncode == 0 else []
    return files or sorted(p for p in ROOT.rglob("*.py") if ".venv" not in p.parts)


def test_no_exec_eval_or_two_statements_on_a_line():
    """comfy-cli's publish check (ruff S102, S307, E702): it warns now and says these will become errors."""
    problems = []
    for path in _python_files():
        source = path.read_text()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("exec", "eval"):
                problems.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.func.id}()")
        with open(path, "rb") as file:
            for token in tokenize.tokenize(file.readline):
                if token.type == tokenize.OP and token.string == ";":
                    problems.append(f"{path.relative_to(ROOT)}:{token.start[0]}: two statements on one line")
    assert not problems, problems


def test_publish_workflow_uses_the_registrys_action():
    workflow = (ROOT / ".github" / "workflows" / "publish.yml").read_text()
    assert "uses: Comfy-Org/publish-node-action@" in workflow
    assert "personal_access_token: ${{ secrets.REGISTRY_ACCESS_TOKEN }}" in workflow
    assert '"pyproject.toml"' in workflow  # publishes when the version in pyproject.toml changes


def test_changelog_has_the_current_version():
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert re.search(rf"^## {re.escape(PROJECT['version'])}\b", changelog, re.M), PROJECT["version"]


@pytest.mark.parametrize("name, ok", [("comfy-diffusionrig", True), ("diffusion.rig_2", True),
                                      ("2-tool", False), ("-tool", False), ("a--b", False), ("a-.b", False),
                                      ("x" * 100, False)])
def test_the_node_id_rule_itself(name, ok):
    assert bool(len(name) < 100 and NODE_ID.match(name)) == ok
