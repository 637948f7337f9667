"""ComfyUI nodes: thin adapters over ``oneforcing.pipelines``.

The logic lives in plain functions (``model_loading``, ``sampling``, ``decoding``) and the nodes are declared as plain
data (``definitions.NODE_SPECS``), so everything here imports and runs without ComfyUI; only ``comfy_nodes`` imports
ComfyUI's ``comfy_api`` and builds the V3 node classes from the declarations.
"""

from .definitions import NODE_SPECS
from .folders import BUNDLED_DEMO, list_models, set_model_roots
from .spec import NodeSpec, object_info, validate_spec

__all__ = ["BUNDLED_DEMO", "NODE_SPECS", "NodeSpec", "list_models", "object_info", "set_model_roots", "validate_spec"]
