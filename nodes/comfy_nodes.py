"""ComfyUI V3 nodes (``comfy_api.latest``) built from the plain declarations in ``definitions.py``.

Importing this module needs ComfyUI's ``comfy_api``; the rest of the package does not.
"""

from __future__ import annotations

import inspect

from comfy_api.latest import ComfyExtension, io

from .definitions import NODE_SPECS
from .spec import InputSpec, NodeSpec, OutputSpec
from .workflow_inputs import install_workflow_inputs

_SOCKETS = {
    "CONDITIONING": io.Conditioning,
    "LATENT": io.Latent,
    "VAE": io.Vae,
    "IMAGE": io.Image,
}


def _socket(type_name: str):
    return _SOCKETS.get(type_name) or io.Custom(type_name)


def schema_input(item: InputSpec):
    common = dict(tooltip=item.tooltip, optional=item.optional)
    if item.type == "INT":
        return io.Int.Input(item.id, default=item.default, min=item.min, max=item.max, step=item.step,
                            control_after_generate=item.control_after_generate or None, **common)
    if item.type == "FLOAT":
        return io.Float.Input(item.id, default=item.default, min=item.min, max=item.max, step=item.step, **common)
    if item.type == "STRING":
        return io.String.Input(item.id, default=item.default, multiline=item.multiline, **common)
    if item.type == "BOOLEAN":
        return io.Boolean.Input(item.id, default=item.default, **common)
    if item.type == "COMBO":
        return io.Combo.Input(item.id, options=item.choices(), default=item.default, **common)
    return _socket(item.type).Input(item.id, **common)


def schema_output(item: OutputSpec):
    return _socket(item.type).Output(display_name=item.name, tooltip=item.tooltip)


def comfy_node(spec: NodeSpec) -> type[io.ComfyNode]:
    """A V3 node class for ``spec`` (named after its node id)."""

    def define_schema(cls):
        return io.Schema(
            node_id=spec.node_id,
            display_name=spec.display_name,
            category=spec.category,
            description=spec.description,
            inputs=[schema_input(i) for i in spec.inputs],
            outputs=[schema_output(o) for o in spec.outputs],
        )

    def execute(cls, **inputs):
        return io.NodeOutput(*spec.function(**inputs))

    namespace = {
        "__doc__": spec.description,
        "__module__": __name__,
        "define_schema": classmethod(define_schema),
        "execute": classmethod(execute),
    }
    if spec.fingerprint is not None:
        fingerprint = spec.fingerprint
        namespace["fingerprint_inputs"] = classmethod(lambda cls, **inputs: fingerprint(**inputs))
    if spec.validate is not None:
        namespace["validate_inputs"] = classmethod(queue_time_check(spec.validate))
    return type(spec.node_id, (io.ComfyNode,), namespace)


def queue_time_check(validate):
    """``validate`` as ComfyUI's ``validate_inputs(cls, ...)``: True, or the reason as a string.

    ComfyUI reads which inputs to pass from the signature, and skips its own range checks for every input when the
    hook takes ``**kwargs``; the hook therefore carries ``validate``'s named parameters.
    """

    def validate_inputs(cls, **inputs):
        problem = validate(**inputs)
        return True if problem is None else problem

    params = [inspect.Parameter("cls", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params += list(inspect.signature(validate).parameters.values())
    validate_inputs.__signature__ = inspect.Signature(params)
    return validate_inputs


NODE_CLASSES: list[type[io.ComfyNode]] = [comfy_node(spec) for spec in NODE_SPECS]


class OneForcingExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODE_CLASSES)


async def comfy_entrypoint() -> OneForcingExtension:
    install_workflow_inputs()  # the image-to-video workflow's start image, into ComfyUI's input/
    return OneForcingExtension()
