"""Run ComfyUI workflow files without ComfyUI: UI -> API conversion, validation, execution.

Nothing here imports torch or ComfyUI at module level.
"""

from .convert import ConversionError, detect_format, load_workflow, ui_to_api
from .execute import NodeExecutionError, RunResult, ValidationError, WorkflowError, apply_overrides, execute, validate
from .object_info import node_info, object_info

__all__ = [
    "ConversionError", "NodeExecutionError", "RunResult", "ValidationError", "WorkflowError",
    "apply_overrides", "detect_format", "execute", "load_workflow", "node_info", "object_info",
    "ui_to_api", "validate",
]
