"""ComfyUI workflow files: build them in the frontend's UI format, check them, convert them to API format.

Used by tools/make_workflows.py (writes workflows/*.json) and by the tests (checks every
workflow against the nodes' INPUT_TYPES, runs them on the node functions and through ComfyUI's
HTTP API). It models how the real frontend reads widgets_values; tests/test_frontend.py checks
that model against the real frontend, which reads and converts each workflow itself.
"""

from __future__ import annotations

from comfy_diffusionrig.demo.synthetic import DEMO_UPSCALER_NAME

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")

# the few core ComfyUI nodes our workflows use, as their INPUT_TYPES / RETURN_TYPES (ComfyUI 0.3.x)
CORE_NODES = {
    "PreviewImage": {"input": {"required": {"images": ("IMAGE",)}}, "output": ()},
    "SaveImage": {"input": {"required": {"images": ("IMAGE",), "filename_prefix": ("STRING", {"default": "ComfyUI"})}},
                  "output": ()},
    "ImageScaleBy": {"input": {"required": {
        "image": ("IMAGE",),
        "upscale_method": (["nearest-exact", "bilinear", "area", "bicubic", "lanczos"],),
        "scale_by": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 8.0, "step": 0.01})}}, "output": ("IMAGE",)},
    "RepeatImageBatch": {"input": {"required": {"image": ("IMAGE",), "amount": ("INT", {"default": 1, "min": 1,
                                                                                         "max": 4096})}},
                         "output": ("IMAGE",)},
    # the combo lists ComfyUI's models/upscale_models/; here only the demo-assets stand-in is known
    "UpscaleModelLoader": {"input": {"required": {"model_name": ([DEMO_UPSCALER_NAME],)}},
                           "output": ("UPSCALE_MODEL",)},
    "ImageUpscaleWithModel": {"input": {"required": {"upscale_model": ("UPSCALE_MODEL",), "image": ("IMAGE",)}},
                              "output": ("IMAGE",)},
    "MaskToImage": {"input": {"required": {"mask": ("MASK",)}}, "output": ("IMAGE",)},
}


def node_spec(node_type: str, mappings: dict) -> dict:
    """{"input": INPUT_TYPES-like dict, "output": RETURN_TYPES} of one of our nodes or a known core node."""
    if node_type in mappings:
        cls = mappings[node_type]
        return {"input": cls.INPUT_TYPES(), "output": tuple(cls.RETURN_TYPES),
                "output_names": tuple(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES))}
    if node_type in CORE_NODES:
        spec = CORE_NODES[node_type]
        return {**spec, "output_names": spec["output"]}
    raise KeyError(f"unknown node type {node_type!r}")


def _inputs(spec: dict) -> list[tuple[str, tuple]]:
    return [(name, entry) for section in ("required", "optional") for name, entry in spec["input"].get(section, {}).items()]


def is_widget(entry: tuple) -> bool:
    return isinstance(entry[0], list) or entry[0] in WIDGET_TYPES


# INT inputs of these names get a control widget from the frontend even when their spec does not ask for one
# (comfyui-frontend-package 1.27, useIntWidget: "Compatibility with legacy node convention")
CONTROL_BY_NAME = ("seed", "noise_seed")


def has_control_widget(name: str, entry: tuple) -> bool:
    """Whether the frontend adds a 'control after generate' widget after this input's widget, whose value
    ("fixed", "increment", ...) is saved in widgets_values right after the input's own. The frontend's rule
    (1.27, useIntWidget): an INT input whose spec says control_after_generate, or, when the spec does not say,
    one named seed or noise_seed. A combo that asks for one also gets a filter-list widget: not modelled here."""
    options = entry[1] if len(entry) > 1 else {}
    wanted = options.get("control_after_generate")
    if entry[0] != "INT":
        if wanted:
            raise ValueError(f"input {name!r}: control_after_generate is modelled for INT inputs only (the frontend "
                             "adds two widgets to a combo)")
        return False
    return bool(name in CONTROL_BY_NAME if wanted is None else wanted)


class Graph:
    """A UI-format workflow under construction: add nodes with widget values, connect outputs to inputs."""

    def __init__(self, mappings: dict):
        self.mappings = mappings
        self.nodes: list[dict] = []
        self.links: list[list] = []

    def add(self, node_type: str, pos: tuple[int, int], title: str | None = None, **widgets) -> int:
        spec = node_spec(node_type, self.mappings)
        values, inputs = [], []
        for name, entry in _inputs(spec):
            if is_widget(entry):
                default = entry[1].get("default") if len(entry) > 1 else None
                if default is None and isinstance(entry[0], list):
                    default = entry[0][0] if entry[0] else ""
                value = widgets.pop(name, default)
                values.append(value)
                if has_control_widget(name, entry):
                    values.append("fixed")
            else:
                inputs.append({"name": name, "type": entry[0], "link": None})
        if widgets:
            raise KeyError(f"{node_type} has no widget(s) {sorted(widgets)}")
        node_id = len(self.nodes) + 1
        outputs = [{"name": n, "type": t, "links": [], "slot_index": i}
                   for i, (t, n) in enumerate(zip(spec["output"], spec["output_names"]))]
        node = {"id": node_id, "type": node_type, "pos": list(pos), "size": [320, 60 + 26 * (len(values) + len(inputs))],
                "flags": {}, "order": node_id - 1, "mode": 0, "inputs": inputs, "outputs": outputs,
                "properties": {"Node name for S&R": node_type}, "widgets_values": values}
        if title:
            node["title"] = title
        self.nodes.append(node)
        return node_id

    def connect(self, src: int, output: str, dst: int, input_name: str) -> None:
        a, b = self.nodes[src - 1], self.nodes[dst - 1]
        slot = next(i for i, o in enumerate(a["outputs"]) if o["name"] == output)
        target = next(i for i, x in enumerate(b["inputs"]) if x["name"] == input_name)
        link_id = len(self.links) + 1
        kind = a["outputs"][slot]["type"]
        self.links.append([link_id, src, slot, dst, target, kind])
        a["outputs"][slot]["links"].append(link_id)
        b["inputs"][target]["link"] = link_id

    def to_json(self) -> dict:
        for node in self.nodes:  # unconnected optional inputs are left out, as the frontend saves them
            node["inputs"] = [x for x in node["inputs"] if x["link"] is not None or not self._optional(node, x["name"])]
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": [], "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}},
                "version": 0.4}

    def _optional(self, node: dict, name: str) -> bool:
        return name in node_spec(node["type"], self.mappings)["input"].get("optional", {})


def check_workflow(workflow: dict, mappings: dict) -> list[str]:
    """Problems of a UI-format workflow: unknown nodes, widget values that do not fit, inconsistent links."""
    problems = []
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = {link[0]: link for link in workflow["links"]}
    for node in workflow["nodes"]:
        where = f"node {node['id']} ({node['type']})"
        try:
            spec = node_spec(node["type"], mappings)
        except KeyError as err:
            problems.append(f"{where}: {err}")
            continue
        values = list(node.get("widgets_values", []))
        for name, entry in _inputs(spec):
            if not is_widget(entry):
                continue
            if not values:
                problems.append(f"{where}: no value for widget {name!r}")
                break
            value = values.pop(0)
            kind, options = entry[0], (entry[1] if len(entry) > 1 else {})
            if isinstance(kind, list):
                if kind and value not in kind and not options.get("allow_any_file"):
                    problems.append(f"{where}: {name}={value!r} is not one of {kind[:6]}")
            elif kind == "INT" and not (isinstance(value, int) and not isinstance(value, bool)):
                problems.append(f"{where}: {name}={value!r} is not an INT")
            elif kind == "FLOAT" and not isinstance(value, (int, float)):
                problems.append(f"{where}: {name}={value!r} is not a FLOAT")
            elif kind == "STRING" and not isinstance(value, str):
                problems.append(f"{where}: {name}={value!r} is not a STRING")
            elif kind == "BOOLEAN" and not isinstance(value, bool):
                problems.append(f"{where}: {name}={value!r} is not a BOOLEAN")
            if kind in ("INT", "FLOAT") and isinstance(value, (int, float)):
                if "min" in options and value < options["min"] or "max" in options and value > options["max"]:
                    problems.append(f"{where}: {name}={value!r} is outside [{options.get('min')}, {options.get('max')}]")
            if has_control_widget(name, entry):
                control = values.pop(0) if values else None
                if control not in ("fixed", "increment", "decrement", "randomize"):
                    problems.append(f"{where}: {name} lacks its control-after-generate value")
        if values:
            problems.append(f"{where}: {len(values)} widget value(s) too many: {values}")
        required = {n for n, e in spec["input"].get("required", {}).items() if not is_widget(e)}
        for slot in node.get("inputs", []):
            link = slot.get("link")
            if link is None:
                if slot["name"] in required:
                    problems.append(f"{where}: required input {slot['name']!r} is not connected")
                continue
            if link not in links:
                problems.append(f"{where}: input {slot['name']!r} names missing link {link}")
                continue
            _, src, src_slot, dst, _, kind = links[link]
            if dst != node["id"] or src not in nodes:
                problems.append(f"{where}: link {link} does not lead here from an existing node")
                continue
            try:
                out_type = node_spec(nodes[src]["type"], mappings)["output"][src_slot]
            except (KeyError, IndexError):
                problems.append(f"{where}: input {slot['name']!r} comes from an unknown node or output")
                continue
            if out_type != slot["type"] or kind != slot["type"]:
                problems.append(f"{where}: input {slot['name']!r} wants {slot['type']}, link {link} carries {out_type}")
        connected = {s["name"] for s in node.get("inputs", []) if s.get("link") is not None}
        for name in required - connected:
            problems.append(f"{where}: required input {name!r} is missing")
    for link_id, src, src_slot, dst, dst_slot, kind in workflow["links"]:
        if src not in nodes or dst not in nodes:
            problems.append(f"link {link_id} joins missing nodes {src} -> {dst}")
        elif link_id not in nodes[src]["outputs"][src_slot]["links"]:
            problems.append(f"link {link_id} is not listed by node {src}'s output {src_slot}")
    return problems


def to_api(workflow: dict, mappings: dict) -> dict:
    """UI format -> the API format ComfyUI's /prompt takes: {id: {class_type, inputs}}."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node.get("mode", 0) != 0:
            continue
        spec = node_spec(node["type"], mappings)
        values = list(node.get("widgets_values", []))
        inputs = {}
        for name, entry in _inputs(spec):
            if is_widget(entry):
                inputs[name] = values.pop(0)
                if has_control_widget(name, entry):
                    values.pop(0)
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                _, src, src_slot, _, _, _ = links[slot["link"]]
                inputs[slot["name"]] = [str(src), src_slot]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt
