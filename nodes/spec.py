"""Node declarations as plain data, independent of ComfyUI.

Each node is a :class:`NodeSpec`: its id, inputs, outputs and the plain function that runs it. ``comfy_nodes.py``
turns a spec into a ComfyUI V3 ``io.ComfyNode`` when ComfyUI is there; without ComfyUI the same specs are checked by
:func:`validate_spec` and rendered by :func:`object_info` in the shape of ComfyUI's ``/object_info`` entries, which is
what the workflow checks compare against.
"""

from __future__ import annotations

import inspect
import keyword
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
# socket types these nodes use; custom ones are this package's own
SOCKET_TYPES = ("ONEFORCING_MODEL", "CONDITIONING", "LATENT", "VAE", "IMAGE")
NODE_ID_PREFIX = "OneForcing"


@dataclass(frozen=True)
class InputSpec:
    """One input. ``type`` is a widget type (INT, FLOAT, STRING, BOOLEAN, COMBO) or a socket type (LATENT, ...).

    ``options`` (COMBO only) is a sequence or a zero-argument callable giving the current choices (model lists are
    re-read when ComfyUI asks for the schema).
    """

    id: str
    type: str
    tooltip: str = ""
    optional: bool = False
    default: Any = None
    min: float | None = None
    max: float | None = None
    step: float | None = None
    options: Sequence[str] | Callable[[], Sequence[str]] | None = None
    multiline: bool = False
    control_after_generate: bool = False

    @property
    def is_widget(self) -> bool:
        return self.type in WIDGET_TYPES

    def choices(self) -> list[str]:
        options = self.options() if callable(self.options) else self.options
        return list(options or ())


@dataclass(frozen=True)
class OutputSpec:
    type: str
    name: str
    tooltip: str = ""


@dataclass(frozen=True)
class NodeSpec:
    """A node: ``function(**inputs)`` returns a tuple with one value per output.

    ``validate(**some_inputs)``, if given, runs when a prompt is queued (ComfyUI's ``validate_inputs``), before
    anything executes: it takes widget inputs by name (its parameters say which) and returns None when they are fine,
    else the reason. ComfyUI's own range and type checks still run for the other inputs.
    """

    node_id: str
    display_name: str
    category: str
    description: str
    inputs: tuple[InputSpec, ...]
    outputs: tuple[OutputSpec, ...]
    function: Callable[..., tuple]
    fingerprint: Callable[..., Any] | None = None  # inputs -> value that changes when a file on disk changes
    validate: Callable[..., str | None] | None = None
    extra: dict = field(default_factory=dict)

    def input(self, input_id: str) -> InputSpec:
        for spec in self.inputs:
            if spec.id == input_id:
                return spec
        raise KeyError(f"{self.node_id} has no input {input_id!r}")


def validate_spec(spec: NodeSpec) -> None:
    """Raise ``ValueError`` listing every problem of a declaration: ids, types, defaults vs ranges and choices, and
    that the input ids are exactly the parameters of ``spec.function``."""
    problems = []
    if not spec.node_id.startswith(NODE_ID_PREFIX) or not spec.node_id.isidentifier():
        problems.append(f"node id {spec.node_id!r} must be an identifier starting with {NODE_ID_PREFIX!r}")
    if not spec.display_name or "One" not in spec.display_name:
        problems.append(f"display name {spec.display_name!r} must name the package (distinct from ComfyUI's nodes)")
    if not spec.category.startswith("OneForcing"):
        problems.append(f"category {spec.category!r} must start with 'OneForcing'")
    if not spec.outputs:
        problems.append("a node needs at least one output")
    ids = [i.id for i in spec.inputs]
    if len(set(ids)) != len(ids):
        problems.append(f"input ids repeat: {ids}")
    for item in spec.inputs:
        problems += [f"input {item.id!r}: {p}" for p in _input_problems(item)]
    seen_optional = False
    for item in spec.inputs:
        if item.optional:
            seen_optional = True
        elif seen_optional:
            problems.append(f"required input {item.id!r} comes after an optional one")
    for out in spec.outputs:
        if out.type not in SOCKET_TYPES:
            problems.append(f"output {out.name!r}: unknown type {out.type!r}")
    # keyword-only parameters are hooks for direct callers (progress, cancel), not node inputs
    params = {
        name: p for name, p in inspect.signature(spec.function).parameters.items() if p.kind != p.KEYWORD_ONLY
    }
    if set(params) != set(ids):
        problems.append(f"inputs {sorted(ids)} differ from the parameters of {spec.function.__name__}: {sorted(params)}")
    for item in spec.inputs:
        param = params.get(item.id)
        if param is not None and item.optional and param.default is inspect.Parameter.empty:
            problems.append(f"optional input {item.id!r} needs a default in {spec.function.__name__}")
        elif param is not None and item.optional and item.is_widget and param.default != item.default:
            # an API prompt may leave an optional widget out: the function's default must be the declared one
            problems.append(f"optional input {item.id!r}: default {item.default!r} but {spec.function.__name__} "
                            f"defaults to {param.default!r}")
    if spec.validate is not None:
        checked = list(inspect.signature(spec.validate).parameters)
        widgets = {i.id for i in spec.inputs if i.is_widget}
        if not checked or not set(checked) <= widgets:
            problems.append(f"validate checks {checked}: it must take some of the widget inputs {sorted(widgets)}")
        for name, param in inspect.signature(spec.validate).parameters.items():
            if name in widgets and spec.input(name).optional and param.default is inspect.Parameter.empty:
                problems.append(f"validate: optional input {name!r} needs a default (a prompt may leave it out)")
    if problems:
        raise ValueError(f"{spec.node_id}: " + "; ".join(problems))


def _input_problems(item: InputSpec) -> list[str]:
    problems = []
    if not item.id.isidentifier() or keyword.iskeyword(item.id):
        problems.append("id must be a Python identifier (it is passed as a keyword argument)")
    if not item.tooltip:
        problems.append("needs a tooltip")
    if item.type not in WIDGET_TYPES and item.type not in SOCKET_TYPES:
        problems.append(f"unknown type {item.type!r}")
    if item.type in ("INT", "FLOAT"):
        if item.default is None or item.min is None or item.max is None:
            problems.append("numbers need default, min and max")
        elif not item.min <= item.default <= item.max:
            problems.append(f"default {item.default} outside [{item.min}, {item.max}]")
        elif item.step and item.type == "INT" and (item.default - item.min) % item.step:
            problems.append(f"default {item.default} is not min {item.min} + k * step {item.step}")
    if item.type == "COMBO":
        choices = item.choices()
        if not choices:
            problems.append("a combo needs choices")
        elif item.default not in choices:
            problems.append(f"default {item.default!r} is not one of {choices}")
    elif item.options is not None:
        problems.append("only a COMBO has options")
    if item.control_after_generate and item.type != "INT":
        problems.append("control_after_generate is for INT inputs")
    if item.type == "STRING" and not isinstance(item.default, str):
        problems.append("a STRING needs a string default")
    if not item.is_widget and item.default is not None:
        problems.append("a socket input has no default")
    return problems


def object_info(spec: NodeSpec) -> dict:
    """The node's entry as ComfyUI's ``GET /object_info`` lists it (the parts workflows depend on)."""
    sections: dict[str, dict] = {"required": {}}
    for item in spec.inputs:
        options = {}
        if item.tooltip:
            options["tooltip"] = item.tooltip
        if item.default is not None:
            options["default"] = item.default
        for name in ("min", "max", "step"):
            if getattr(item, name) is not None:
                options[name] = getattr(item, name)
        if item.multiline:
            options["multiline"] = True
        if item.control_after_generate:
            options["control_after_generate"] = True
        if item.type == "COMBO":
            options["options"] = item.choices()
            entry = ["COMBO", options]
        else:
            entry = [item.type, options]
        sections.setdefault("optional" if item.optional else "required", {})[item.id] = entry
    return {
        "input": sections,
        "input_order": {key: list(value) for key, value in sections.items()},
        "output": [o.type for o in spec.outputs],
        "output_name": [o.name for o in spec.outputs],
        "name": spec.node_id,
        "display_name": spec.display_name,
        "category": spec.category,
        "output_node": False,
    }
