"""The road back to torch: fine-tune a planned model, and apply a plan to a user's nn.Module.

finetune() trains the fake-quant twin of the model the compiler writes for a plan and
returns the compiled model of its best epoch (train.py); apply_plan() puts the same grids
on a torch model's Conv2d/Linear modules for people who train in their own loop
(modules.py). See docs/finetune.md. Imports torch: load it lazily from the CLI.
"""

from .graph import compiled_plan, float_model_of, training_graph
from .modules import ModulePlan, apply_plan, planned_modules, remove_plan
from .train import EpochRecord, FinetuneResult, FinetuneSettings, RoundTrip, finetune, with_weights

__all__ = [
    "ModulePlan",
    "apply_plan",
    "planned_modules",
    "remove_plan",
    "EpochRecord",
    "FinetuneResult",
    "FinetuneSettings",
    "RoundTrip",
    "compiled_plan",
    "finetune",
    "float_model_of",
    "training_graph",
    "with_weights",
]
