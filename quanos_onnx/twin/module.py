"""OnnxTwin: an nn.Module that runs an ONNX graph through the op registry.

Values live in a dict keyed by ONNX tensor name for the duration of one pass; any of them
can be captured (ANS activations, debugging) from the same pass that produces the outputs.
Float initializers are nn.Parameters addressable by their ONNX names and can be written
back into the model after training, so exporting a fine-tuned model reuses the original
graph instead of a second exporter.

Batch: a model exported at batch 1 (input dim 1, batch baked into Reshape constants) is
first rewritten to a symbolic batch by quanos_onnx.model.dynamic_batch, which keeps the
rewrite only when onnxruntime proves it equivalent. Otherwise the twin runs per sample:
the caller still passes and receives whole batches, the twin loops inside.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import onnx
import torch
from torch import nn

from ..errors import DataError, ModelError
from ..model import dynamic_batch
from .fusion import emulate, fused_kernels
from .graph import CompiledGraph, GraphProgram, check_supported, compile_graph, prepare_model
from .tensors import tensor_to_proto

log = logging.getLogger(__name__)

_RUNTIME_ERRORS = (RuntimeError, ValueError, IndexError, TypeError)


class OnnxTwin(nn.Module):
    """A differentiable executor of one ONNX graph; build it with build_twin()."""

    def __init__(self, compiled: CompiledGraph, *, batch_one_inputs: Sequence[str] = ()) -> None:
        super().__init__()
        self.program: GraphProgram = compiled.program
        self.batch_one_inputs = tuple(batch_one_inputs)
        """Inputs fixed at batch 1 that could not be freed: batches are run sample by sample."""
        self._parameter_names = tuple(compiled.parameters)
        self._parameter_types = dict(compiled.parameter_types)
        self.initializers = nn.ParameterList(
            nn.Parameter(tensor, requires_grad=name in compiled.trainable)
            for name, tensor in compiled.parameters.items()
        )
        self._constant_names = tuple(compiled.constants)
        self._constant_slots = tuple(f"constant_{index}" for index in range(len(compiled.constants)))
        for slot, tensor in zip(self._constant_slots, compiled.constants.values()):
            self.register_buffer(slot, tensor)

    @property
    def input_names(self) -> tuple[str, ...]:
        return self.program.inputs

    @property
    def output_names(self) -> tuple[str, ...]:
        return self.program.outputs

    def parameters_by_name(self) -> dict[str, nn.Parameter]:
        """Every float initializer (quantizer scales aside) by its ONNX name."""
        return dict(zip(self._parameter_names, self.initializers))

    def constants_by_name(self) -> dict[str, torch.Tensor]:
        """Integer initializers, quantizer parameters and values folded at build time."""
        return {name: getattr(self, slot) for name, slot in zip(self._constant_names, self._constant_slots)}

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Graph inputs in graph order; returns the single output, or a tuple of all outputs."""
        if len(inputs) != len(self.input_names):
            raise DataError(
                f"the model takes {len(self.input_names)} input(s) ({', '.join(self.input_names)}), got {len(inputs)}"
            )
        outputs, _ = self.run(dict(zip(self.input_names, inputs)))
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def run(
        self, inputs: Mapping[str, torch.Tensor], capture: Sequence[str] = ()
    ) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        """Graph outputs in order, and the named tensors of the same pass."""
        missing = [name for name in self.input_names if name not in inputs]
        unknown = [name for name in inputs if name not in self.input_names]
        if missing or unknown:
            raise DataError(
                f"model inputs are {list(self.input_names)}; missing {missing}, unexpected {unknown}"
            )
        absent = [name for name in capture if name not in self.program.tensor_names]
        if absent:
            raise ModelError(f"cannot capture '{absent[0]}': the graph has no tensor of that name")
        if not self.per_sample:
            return self._execute(inputs, frozenset(capture))
        return self._execute_per_sample(inputs, frozenset(capture))

    @property
    def per_sample(self) -> bool:
        """True when the graph only runs at batch 1, so batches are run sample by sample."""
        return bool(self.batch_one_inputs)

    def write_back(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """A copy of the model whose float initializers hold this twin's current parameter values."""
        updated = onnx.ModelProto()
        updated.CopyFrom(model)
        parameters = self.parameters_by_name()
        present = {tensor.name for tensor in updated.graph.initializer}
        foreign = sorted(set(parameters) - present)
        if foreign:
            raise ModelError(
                f"cannot write back: the model has no initializer '{foreign[0]}' (built from another model?)"
            )
        for tensor in updated.graph.initializer:
            parameter = parameters.get(tensor.name)
            if parameter is None or tensor.data_type != self._parameter_types[tensor.name]:
                continue
            if tuple(tensor.dims) != tuple(parameter.shape):
                raise ModelError(
                    f"cannot write back '{tensor.name}': model shape {list(tensor.dims)}, twin {list(parameter.shape)}"
                )
            tensor.CopyFrom(tensor_to_proto(parameter, tensor.name, tensor.data_type))
        return updated

    def _static_values(self) -> dict[str, torch.Tensor]:
        values: dict[str, torch.Tensor] = dict(zip(self._parameter_names, self.initializers))
        for name, slot in zip(self._constant_names, self._constant_slots):
            values[name] = getattr(self, slot)
        return values

    def _execute(
        self, inputs: Mapping[str, torch.Tensor], capture: frozenset[str]
    ) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        values = self._static_values()
        values.update(inputs)
        for step in self.program.steps:
            arguments = [values[name] if name else None for name in step.inputs]
            try:
                results = step.function(step.attributes, arguments)
            except _RUNTIME_ERRORS as error:
                shapes = [tuple(a.shape) if a is not None else None for a in arguments]
                raise ModelError(
                    f"{step.op_type} node '{step.node_name}' failed on inputs of shapes {shapes}: {error}"
                ) from error
            for name, value in zip(step.outputs, results):
                if name:
                    values[name] = value
            for name in step.release:
                if name not in capture:
                    del values[name]
        return [values[name] for name in self.program.outputs], {name: values[name] for name in capture}

    def _sample(self, inputs: Mapping[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
        """Sample `index` of the batch-1 inputs; other inputs are passed whole."""
        return {
            name: value[index : index + 1] if name in self.batch_one_inputs else value
            for name, value in inputs.items()
        }

    def _execute_per_sample(
        self, inputs: Mapping[str, torch.Tensor], capture: frozenset[str]
    ) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        """Run sample by sample and concatenate along the first axis (captures included)."""
        sizes = {inputs[name].shape[0] for name in self.batch_one_inputs}
        if len(sizes) > 1:
            raise DataError(f"inputs {list(self.batch_one_inputs)} disagree on the batch size: {sorted(sizes)}")
        batch = sizes.pop()
        if batch == 1:
            return self._execute(inputs, capture)
        runs = [self._execute(self._sample(inputs, index), capture) for index in range(batch)]
        outputs = [torch.cat([run[0][position] for run in runs]) for position in range(len(self.program.outputs))]
        captured = {name: torch.cat([run[1][name] for run in runs]) for name in capture}
        return outputs, captured


def _batch_one_inputs(model: onnx.ModelProto) -> list[str]:
    """Graph inputs whose first dim is fixed at 1."""
    names = []
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value == 1:
            names.append(value.name)
    return names


def build_twin(model: onnx.ModelProto, *, trainable: bool = False) -> OnnxTwin:
    """The torch twin of an ONNX model (raw export or normalized), ready to run at any batch.

    Raises UnsupportedOpError naming every node the registry cannot run before doing any
    other work. Float initializers with more than one element become trainable parameters
    when `trainable` (running statistics, clipping bounds and quantizer parameters never do).
    """
    prepared = prepare_model(model)
    check_supported(prepared)
    batch_one = _batch_one_inputs(prepared)
    if batch_one:
        rewritten, freed = dynamic_batch(prepared)
        if freed:
            prepared, batch_one = rewritten, []
        else:
            log.info("the model only runs at batch 1; the twin will run batches sample by sample")
    compiled = emulate(compile_graph(prepared, trainable=trainable), fused_kernels(prepared))
    twin = OnnxTwin(compiled, batch_one_inputs=batch_one)
    twin.eval()
    return twin
