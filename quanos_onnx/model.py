"""Loading, normalizing and saving ONNX models; onnxruntime sessions.

This is the IR boundary: everything downstream sees one normal form (opset 21, constant
weights as initializers, unique node names, inferred shapes), so no stage has to cope with
the variety of real exports (CNTK opset 8, torch legacy and dynamo, Constant-node weights,
initializers listed as inputs, batch 1 baked in).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes import common as common_passes

from .errors import ModelError, OutputError, UnsupportedOpError, UsageError, arg

if TYPE_CHECKING:
    import onnxruntime

    from .data import InputSpec

log = logging.getLogger(__name__)

TARGET_OPSET = 21
"""The opset every model is normalized to and every output is written at (ORT 1.32 has no
kernels for Q/DQ at opset 28, and 21 is the first with int4/int16 Q/DQ)."""

TARGET_IR_VERSION = 10
"""The IR version that goes with opset 21."""

MAX_INPUT_OPSET = 25
"""The newest opset accepted as input (onnxruntime 1.32 implements up to here)."""

_NO_FOLD = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "RandomNormal",
        "RandomUniform",
        "RandomNormalLike",
        "RandomUniformLike",
        "Multinomial",
        "Bernoulli",
    }
)
_FOLD_SIZE_LIMIT = 1 << 24

_STANDARD_DOMAINS = ("", "ai.onnx", "ai.onnx.ml")
_ONNXRUNTIME_DOMAINS = ("com.microsoft",)
"""onnxruntime's contrib ops: onnxruntime runs them, but ONNX shape inference and the torch
twin do not know them, so they are refused by name rather than failing later."""


def load_model(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Read an ONNX file and return it in the project's normal form."""
    source = Path(path)
    proto = read_model(source)
    return normalize(proto, str(source))


def read_model(source: Path) -> onnx.ModelProto:
    """Parse the file (with its external data), failing with the reason in one line."""
    from .inputs import check_regular_file

    if check_regular_file(source, ModelError, "ONNX model file") == 0:
        raise ModelError(f"{source}: file is empty")
    other_format = _other_format(source)
    if other_format is not None:
        raise ModelError(f"{source}: not an ONNX model but {other_format}")
    try:
        proto = onnx.load(str(source), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise ModelError(
            f"{source}: not an ONNX model (protobuf parse failed: {_first_line(exc)})"
        ) from exc
    if not proto.HasField("graph") or len(proto.graph.node) == 0 or proto.ir_version <= 0:
        raise ModelError(f"{source}: parsed as protobuf but holds no ONNX graph")
    _load_external_data(proto, source)
    return proto


_OTHER_FORMATS = (
    (0, b"PK\x03\x04", "a ZIP archive (PyTorch .pt/.pth checkpoints and .npz files are ZIPs)"),
    (0, b"\x93NUMPY", "a NumPy .npy array"),
    (0, b"\x89PNG", "a PNG image"),
    (0, b"\xff\xd8\xff", "a JPEG image"),
    (0, b"\x1f\x8b", "a gzip file (decompress it first)"),
    (0, b"\x89HDF", "an HDF5 file (a Keras model? convert it with tf2onnx)"),
    (4, b"TFL3", "a TensorFlow Lite model (convert it with tf2onnx)"),
)
"""File signatures of formats people hand to an ONNX tool by mistake. ONNX files have no
signature of their own (they are bare protobuf), so only these can be named."""


def _other_format(source: Path) -> str | None:
    with open(source, "rb") as stream:
        head = stream.read(8)
    for offset, signature, description in _OTHER_FORMATS:
        if head[offset:].startswith(signature):
            return description
    return None


def _load_external_data(proto: onnx.ModelProto, source: Path) -> None:
    base = source.parent
    for tensor in proto.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        if not _inside(location):
            raise ModelError(
                f"{source}: initializer '{tensor.name}' refers to external data "
                f"'{location}', outside the model's folder (only files beside the model are read)"
            )
        if not (base / location).is_file():
            raise ModelError(
                f"{source}: initializer '{tensor.name}' refers to external data "
                f"'{location}', which is missing next to the model"
            )
    try:
        onnx.external_data_helper.load_external_data_for_model(proto, str(base))
    except Exception as exc:
        raise ModelError(f"{source}: cannot read external data: {_first_line(exc)}") from exc


def _inside(location: str) -> bool:
    """Whether external data `location` names a file in the model's folder or below it,
    decided from the text alone, so the answer never depends on what exists outside."""
    if "\x00" in location:
        return False
    relative = Path(location)
    if relative.is_absolute() or relative.drive:
        return False
    return ".." not in relative.parts


def normalize(proto: onnx.ModelProto, source: str = "<model>") -> onnx.ModelProto:
    """Bring a parsed model into normal form; every failure names the source and culprit."""
    opset = default_opset(proto)
    if opset > MAX_INPUT_OPSET:
        raise ModelError(
            f"{source}: opset {opset} is newer than supported (at most {MAX_INPUT_OPSET})",
            hint="export the model at opset 17-21",
        )
    _check_signature(_strip_initializer_inputs(proto), source)
    _check_ops(proto, source)
    _check_references(proto, source)
    _check_acyclic(proto, source)
    _check_initializers(proto, source)
    if opset != TARGET_OPSET:
        proto = _convert_opset(proto, opset, source)
    proto = _strip_initializer_inputs(proto)
    proto.ir_version = max(proto.ir_version, TARGET_IR_VERSION)
    from .passes.cleanup import FoldBatchNormPass, FuseBiasAddPass

    model = ir.serde.deserialize_model(proto)
    passes = ir.passes.Sequential(
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        UniqueNodeNamesPass(),
        FoldConstantsPass(),
        FoldBatchNormPass(),
        FuseBiasAddPass(),
        common_passes.RemoveUnusedNodesPass(),
        common_passes.TopologicalSortPass(),
        common_passes.NameFixPass(),
    )
    try:
        passes(model)
    except Exception as exc:
        cause = _root_cause(exc)
        if isinstance(cause, ModelError):
            raise cause from None
        raise ModelError(f"{source}: cannot normalize graph: {_first_line(cause)}") from exc
    proto = ir.serde.serialize_model(model)
    proto = infer_shapes(proto, source)
    check_model(proto, source)
    return proto


def fix_input_shape(
    proto: onnx.ModelProto, input_shape: Sequence[int] | None, source: str = "<model>"
) -> onnx.ModelProto:
    """The model with its input's dynamic dims fixed to ``input_shape`` (``--input-shape``),
    and shapes inferred again from there, so layers, MACs and the twin see static sizes.

    ``input_shape`` gives the sample dims (3x224x224) or all dims (1x3x224x224); the batch
    dim keeps what the model has (usually dynamic), so the batch entry is not used. A dim
    the model already fixes must be given its own size. None returns the model unchanged.
    """
    if input_shape is None:
        return proto
    model = ir.serde.deserialize_model(proto)
    value = model.graph.inputs[0]
    dims = list(value.shape) if value.shape is not None else []
    given = tuple(int(dim) for dim in input_shape)
    if len(given) == len(dims):
        given = given[1:]
    shape_text = "x".join(map(str, input_shape))
    if len(given) != len(dims) - 1:
        raise UsageError(
            f"{arg('input_shape')} {shape_text} has {len(input_shape)} dims; "
            f"{source} input '{value.name}' has {len(dims)} (batch included)",
            hint=f"give the {len(dims) - 1} sample dims, e.g. {'x'.join(['3', '224', '224'][: len(dims) - 1]) or '...'}",
        )
    for axis, (old, new) in enumerate(zip(dims[1:], given), start=1):
        if isinstance(old, int) and old != new:
            raise UsageError(
                f"{arg('input_shape')} {shape_text}: {source} input '{value.name}' has size {old} "
                f"in dimension {axis}, not {new}",
                hint="only dynamic dims can be fixed",
            )
    value.shape = ir.Shape([dims[0], *given])
    outputs = set(model.graph.outputs)
    for node in model.graph:
        for output in node.outputs:
            if output not in outputs:
                output.shape = None  # inferred again from the fixed input below
    log.info("%s: input '%s' fixed to [%s,%s]", source, value.name, dims[0], ",".join(map(str, given)))
    return infer_shapes(ir.serde.serialize_model(model), source)


def _root_cause(exc: BaseException) -> BaseException:
    """The exception a pass raised, without the PassError wrapper (whose message is a list
    of pass-object reprs); a QuanosError on the way is the answer itself."""
    seen: set[int] = set()
    while exc.__cause__ is not None and id(exc) not in seen and not isinstance(exc, ModelError):
        seen.add(id(exc))
        exc = exc.__cause__
    return exc


def default_opset(proto: onnx.ModelProto) -> int:
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return 1


def _strip_initializer_inputs(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Old exporters (ir_version 3) list every initializer as a graph input too."""
    names = {t.name for t in proto.graph.initializer}
    if not any(i.name in names for i in proto.graph.input):
        return proto
    proto = _copy(proto)
    kept = [i for i in proto.graph.input if i.name not in names]
    del proto.graph.input[:]
    proto.graph.input.extend(kept)
    return proto


def _check_signature(proto: onnx.ModelProto, source: str) -> None:
    inputs = list(proto.graph.input)
    if not inputs:
        raise ModelError(f"{source}: the graph has no inputs")
    if len(inputs) > 1:
        names = ", ".join(i.name for i in inputs)
        raise ModelError(
            f"{source}: expected one image input, found {len(inputs)} ({names})"
        )
    if not proto.graph.output:
        raise ModelError(f"{source}: the graph has no outputs")
    tensor_type = inputs[0].type.tensor_type
    if tensor_type.elem_type != onnx.TensorProto.FLOAT:
        type_name = onnx.TensorProto.DataType.Name(tensor_type.elem_type)
        raise ModelError(
            f"{source}: input '{inputs[0].name}' is {type_name}; a float32 image input is needed"
        )
    if not tensor_type.HasField("shape"):
        raise ModelError(
            f"{source}: input '{inputs[0].name}' has unknown rank; a fixed-rank input is needed"
        )
    for axis, dim in enumerate(tensor_type.shape.dim):
        if dim.HasField("dim_value") and dim.dim_value <= 0:
            raise ModelError(
                f"{source}: input '{inputs[0].name}' has size {dim.dim_value} in dimension {axis}; "
                "sizes must be positive or symbolic",
                hint="re-export the model with a symbolic (named) dimension where the size varies",
            )


def _check_ops(proto: onnx.ModelProto, source: str) -> None:
    """Refuse ops nothing can run before the opset converter or shape inference trip on them."""
    local_functions = {(function.domain, function.name) for function in proto.functions}
    for index, node in enumerate(proto.graph.node):
        domain = node.domain or ""
        if (domain, node.op_type) in local_functions:
            continue
        if domain in _ONNXRUNTIME_DOMAINS:
            raise UnsupportedOpError(
                f"{source}: node '{node.name or f'#{index}'}' uses onnxruntime contrib op "
                f"'{domain}:{node.op_type}', which quanos does not support (it reads standard ONNX ops)",
                hint="export the model without onnxruntime's fusions (standard ONNX has Gelu, "
                "LayerNormalization and Attention at opset 20-23)",
            )
        schema_domain = "" if domain == "ai.onnx" else domain
        if domain in _STANDARD_DOMAINS and onnx.defs.has(node.op_type, schema_domain):
            continue
        op = f"{domain}:{node.op_type}" if domain else node.op_type
        raise UnsupportedOpError(
            f"{source}: node '{node.name or f'#{index}'}' uses op '{op}', which is not a standard "
            "ONNX op nor defined by a function in the model"
        )


def _check_references(proto: onnx.ModelProto, source: str) -> None:
    """Every tensor a node reads must come from somewhere; name the first that does not."""
    graph = proto.graph
    produced = {""} | {v.name for v in graph.input} | {t.name for t in graph.initializer}
    produced.update(t.values.name for t in graph.sparse_initializer)
    producers: dict[str, str] = {}
    for index, node in enumerate(graph.node):
        for name in node.output:
            if not name:
                continue
            label = f"node '{node.name or f'#{index}'}'"
            earlier = producers.get(name) or ("a graph input or initializer" if name in produced else None)
            if earlier is not None:
                raise ModelError(f"{source}: tensor '{name}' is produced twice, by {earlier} and by {label}")
            producers[name] = label
    produced.update(producers)
    for index, node in enumerate(graph.node):
        for name in node.input:
            if name not in produced:
                raise ModelError(
                    f"{source}: node '{node.name or f'#{index}'}' ({node.op_type}) reads tensor "
                    f"'{name}', which no node, initializer or graph input produces"
                )
    for output in graph.output:
        if output.name not in produced:
            raise ModelError(f"{source}: graph output '{output.name}' is not produced by any node")


def _check_acyclic(proto: onnx.ModelProto, source: str) -> None:
    """A graph whose nodes feed each other in a loop has no order to run in; name the loop."""
    nodes = list(proto.graph.node)
    producer = {name: index for index, node in enumerate(nodes) for name in node.output if name}
    inputs = [{producer[name] for name in node.input if name in producer} for node in nodes]
    users: list[list[int]] = [[] for _ in nodes]
    for index, sources in enumerate(inputs):
        for origin in sources:
            users[origin].append(index)
    waiting = [len(sources) for sources in inputs]
    ready = [index for index, count in enumerate(waiting) if count == 0]
    done = 0
    while ready:
        index = ready.pop()
        done += 1
        for user in users[index]:
            waiting[user] -= 1
            if waiting[user] == 0:
                ready.append(user)
    if done == len(nodes):
        return
    start = next(index for index, count in enumerate(waiting) if count > 0)
    path: list[int] = []
    while start not in path:
        path.append(start)
        start = next(origin for origin in inputs[start] if waiting[origin] > 0)
    loop = path[path.index(start):][::-1]
    names = " -> ".join(f"'{nodes[i].name or f'#{i}'}'" for i in [*loop[:6], loop[0]])
    raise ModelError(f"{source}: the graph has a cycle: {names}{' ...' if len(loop) > 6 else ''}")


_PACKED_BITS = {
    onnx.TensorProto.INT4: 4,
    onnx.TensorProto.UINT4: 4,
    onnx.TensorProto.INT2: 2,
    onnx.TensorProto.UINT2: 2,
    onnx.TensorProto.FLOAT4E2M1: 4,
}


def _check_initializers(proto: onnx.ModelProto, source: str) -> None:
    """Each initializer holds as many values as its dims say (a truncated weight would
    otherwise fail deep inside a pass)."""
    for tensor in proto.graph.initializer:
        if any(dim < 0 for dim in tensor.dims):
            raise ModelError(f"{source}: initializer '{tensor.name}' has a negative dimension {list(tensor.dims)}")
        count = math.prod(tensor.dims)
        expected = _stored_bytes(tensor.data_type, count)
        if tensor.HasField("raw_data") and expected is not None and len(tensor.raw_data) != expected:
            raise ModelError(
                f"{source}: initializer '{tensor.name}' has {len(tensor.raw_data)} bytes of data, "
                f"but its shape {list(tensor.dims)} needs {expected}"
            )
        for field in ("float_data", "double_data", "int64_data", "uint64_data"):
            values = len(getattr(tensor, field))
            if values and values != count:
                raise ModelError(
                    f"{source}: initializer '{tensor.name}' has {values} values, "
                    f"but its shape {list(tensor.dims)} needs {count}"
                )


def _stored_bytes(data_type: int, count: int) -> int | None:
    """Bytes of raw_data for `count` values of an ONNX type; None for strings and unknowns."""
    if data_type in _PACKED_BITS:
        return (count * _PACKED_BITS[data_type] + 7) // 8
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type))
    except (KeyError, TypeError, ValueError):
        return None
    return None if dtype.kind in "OUS" else count * dtype.itemsize


def _convert_opset(proto: onnx.ModelProto, opset: int, source: str) -> onnx.ModelProto:
    from onnx import version_converter

    try:
        return version_converter.convert_version(proto, TARGET_OPSET)
    except Exception as exc:
        raise ModelError(
            f"{source}: cannot convert opset {opset} to {TARGET_OPSET}: {_first_line(exc)}",
            hint="re-export the model at opset 21",
        ) from exc


def infer_shapes(proto: onnx.ModelProto, source: str = "<model>") -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(proto, check_type=True, data_prop=True)
    except Exception as exc:
        raise ModelError(f"{source}: shape inference failed: {_first_line(exc)}") from exc


def check_model(proto: onnx.ModelProto, source: str = "<model>") -> None:
    try:
        onnx.checker.check_model(proto)
    except Exception as exc:
        raise ModelError(f"{source}: invalid ONNX model: {_first_line(exc)}") from exc


class UniqueNodeNamesPass(ir.passes.InPlacePass):
    """Give every node a unique name that stays the same across runs.

    Plans, reports and fine-tuning refer to layers by node name, so nameless nodes get
    '<OpType>_<index>' and a repeated name gets '_<index>' appended (more '_<index>' while
    that is taken too). It runs before the folding passes, which name the weights and
    biases they create after the layer node.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        taken = {node.name for node in model.graph if node.name}
        seen: set[str] = set()
        modified = False
        for index, node in enumerate(model.graph):
            name = node.name or f"{node.op_type}_{index}"
            while name in seen or (name != node.name and name in taken):
                name = f"{name}_{index}"
            if name != node.name:
                node.name = name
                modified = True
            seen.add(name)
        return ir.passes.PassResult(model, modified)


class FoldConstantsPass(ir.passes.InPlacePass):
    """Evaluate nodes whose inputs are all constants and store the results as initializers.

    Real exports compute weights in the graph (CNTK reshapes its MatMul weight; torch
    exports transpose or cast them); folding makes every layer's weight an initializer.
    Q/DQ nodes are kept so that an already quantized model keeps its integer weights.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from onnx.reference import ReferenceEvaluator

        graph = model.graph
        modified = False
        for node in list(graph):
            if not _foldable(node):
                continue
            values = [v.const_value.numpy() if v is not None else None for v in node.inputs]
            single = _single_node_model(node, model.opset_imports)
            try:
                results = ReferenceEvaluator(single).run(
                    None, {f"in{i}": v for i, v in enumerate(values) if v is not None}
                )
            except Exception as exc:
                log.debug("not folding %s (%s): %s", node.name, node.op_type, exc)
                continue
            for output, result in zip(node.outputs, results):
                initializer = ir.Value(
                    name=output.name,
                    shape=ir.Shape(np.asarray(result).shape),
                    type=ir.TensorType(ir.DataType.from_numpy(np.asarray(result).dtype)),
                    const_value=ir.tensor(np.asarray(result), name=output.name),
                )
                output.replace_all_uses_with(initializer, replace_graph_outputs=False)
                graph.register_initializer(initializer)
            graph.remove(node, safe=False)
            modified = True
        return ir.passes.PassResult(model, modified)


def _foldable(node: ir.Node) -> bool:
    if node.domain not in ("", "ai.onnx") or node.op_type in _NO_FOLD:
        return False
    if not node.inputs or any(v is not None and v.const_value is None for v in node.inputs):
        return False
    if any(out.is_graph_output() for out in node.outputs):
        return False
    size = sum(v.const_value.size for v in node.inputs if v is not None)
    return size <= _FOLD_SIZE_LIMIT


def _single_node_model(node: ir.Node, opset_imports: dict[str, int]) -> onnx.ModelProto:
    inputs = [f"in{i}" if v is not None else "" for i, v in enumerate(node.inputs)]
    outputs = [f"out{i}" for i in range(len(node.outputs))]
    node_proto = onnx.helper.make_node(node.op_type, inputs, outputs, domain=node.domain)
    node_proto.attribute.extend(ir.serde.serialize_attribute(a) for a in node.attributes.values())
    graph = onnx.helper.make_graph(
        [node_proto],
        "fold",
        [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.UNDEFINED, None) for n in inputs if n],
        [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.UNDEFINED, None) for n in outputs],
    )
    opsets = [onnx.helper.make_opsetid(d, v) for d, v in opset_imports.items()]
    return onnx.helper.make_model(graph, opset_imports=opsets)


# ---------------------------------------------------------------------------------------
# Saving


def save_model(
    proto: onnx.ModelProto, path: str | os.PathLike[str], *, protect: Iterable[Path] = ()
) -> Path:
    """Write atomically (temp file + rename) and refuse to overwrite any protected input."""
    target = Path(path)
    guard_output(target, protect)
    data = proto.SerializeToString()
    write_bytes_atomic(target, data)
    return target


PRODUCER_NAME = "quanos-onnx"
SOURCE_PRODUCER_KEYS = ("quanos.source_producer_name", "quanos.source_producer_version")


def stamp_producer(proto: onnx.ModelProto, version: str) -> onnx.ModelProto:
    """Name quanos-onnx as the producer of a model it wrote (in place); the producer of the
    model it was made from moves to metadata (kept as it is when already recorded there)."""
    present = {entry.key for entry in proto.metadata_props}
    if not any(key in present for key in SOURCE_PRODUCER_KEYS):
        for key, value in zip(SOURCE_PRODUCER_KEYS, (proto.producer_name, proto.producer_version)):
            proto.metadata_props.add(key=key, value=value)
    proto.producer_name = PRODUCER_NAME
    proto.producer_version = version
    return proto


def guard_output(target: Path, protect: Iterable[Path]) -> None:
    for original in protect:
        if target.resolve() == Path(original).resolve():
            raise OutputError(f"{target}: refusing to overwrite the input model")


def write_bytes_atomic(target: Path, data: bytes) -> None:
    """The file appears whole or not at all, also on Ctrl-C or a full disk."""
    directory = target.parent if str(target.parent) else Path(".")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        handle, temp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise OutputError(f"{target}: cannot write here: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.chmod(temp_name, 0o666 & ~_umask())
        os.replace(temp_name, target)
    except BaseException as exc:
        Path(temp_name).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise OutputError(f"{target}: cannot write: {exc.strerror or exc}") from exc
        raise


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------
# Inspection helpers


def input_spec(proto: onnx.ModelProto) -> InputSpec:
    """What data must look like to feed this model (data.py fits arrays to it)."""
    from .data import InputSpec

    elem_type = input_value(proto).type.tensor_type.elem_type
    dtype = onnx.helper.tensor_dtype_to_np_dtype(elem_type).name if elem_type else "float32"
    return InputSpec(input_value(proto).name, input_shape(proto), dtype)


def num_classes(proto: onnx.ModelProto, source: str = "<model>") -> int | None:
    """The size of the first output's last dim: the classifier's class count.

    A classifier's output is [N, classes]; any other known rank is refused naming the
    output, since labels checked against its last dim would be checked against nonsense.
    """
    output = proto.graph.output[0]
    tensor_type = output.type.tensor_type
    dims = tensor_type.shape.dim
    if tensor_type.HasField("shape") and len(dims) != 2:
        shape = "x".join(str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in dims)
        raise ModelError(
            f"{source}: output '{output.name}' has shape [{shape or 'scalar'}]; "
            "quanos needs a classifier whose output is [N, classes]",
            hint="export the model's logits (e.g. add a Flatten before the output)",
        )
    if not dims or not dims[-1].HasField("dim_value"):
        return None
    return dims[-1].dim_value


def input_value(proto: onnx.ModelProto) -> onnx.ValueInfoProto:
    return proto.graph.input[0]


def input_shape(proto: onnx.ModelProto) -> tuple[int | None, ...]:
    """The input's dims, None where symbolic."""
    dims = input_value(proto).type.tensor_type.shape.dim
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)


def output_names(proto: onnx.ModelProto) -> list[str]:
    return [o.name for o in proto.graph.output]


def check_finite_initializers(proto: onnx.ModelProto, names: Iterable[str], source: str = "<model>") -> None:
    """A NaN or inf in a weight poisons every output; refuse the model naming the tensor."""
    initializers = initializer_map(proto)
    for name in names:
        tensor = initializers.get(name)
        if tensor is None:
            continue
        values = onnx.numpy_helper.to_array(tensor)
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            count = int((~np.isfinite(values)).sum())
            raise ModelError(f"{source}: initializer '{name}' holds {count} NaN/inf value(s)")


_QUANTIZED_OPS = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "QLinearConv",
        "QLinearMatMul",
        "ConvInteger",
        "MatMulInteger",
        "Quant",
        "BipolarQuant",
        "Trunc",
    }
)
"""Ops of already-quantized graphs: ONNX QDQ and QOperator forms, and QONNX's Quant nodes."""


def refuse_quantized(proto: onnx.ModelProto, source: str = "<model>") -> None:
    """compile reads a float model: a quantized one would be planned around its Q/DQ nodes
    and mostly left as it is, so it is refused naming the first quantizing node."""
    found = [node for node in proto.graph.node if node.op_type in _QUANTIZED_OPS]
    if not found:
        return
    first = found[0]
    raise ModelError(
        f"{source}: already quantized ({len(found)} quantization node(s), the first "
        f"'{first.name}' ({first.op_type})); quanos compile reads a float model",
        hint="compile the float model it came from; quanos evaluate and finetune take a compiled model as it is",
    )


def check_finite_outputs(proto: onnx.ModelProto, x: np.ndarray, source: str = "<model>") -> None:
    """Run the model on a batch of the data and refuse it, naming the output, when an
    output is NaN or inf: gradients and ANS of such a model are meaningless (every layer
    would silently get 16 bits)."""
    outputs = Runner(proto).run(x)
    for name, values in zip(output_names(proto), outputs):
        bad = ~np.isfinite(values)
        if bad.any():
            samples = int(bad.reshape(len(values), -1).any(axis=1).sum()) if values.ndim else 1
            raise ModelError(
                f"{source}: output '{name}' is NaN or inf on {samples} of the first {len(x)} sample(s) of the data",
                hint="check the model in onnxruntime (a Log or Div of zero?) and the data's preprocessing",
            )


def initializer_map(proto: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in proto.graph.initializer}


def _copy(proto: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    return copy


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


# ---------------------------------------------------------------------------------------
# Batch


def dynamic_batch(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    """Let a model exported at batch 1 run at any batch, where that is provably safe.

    The input's and outputs' first dim become symbolic, and Reshape targets that bake the
    batch into their first entry (from data-dependent tensors) copy it from their input
    instead. The rewrite is kept only if onnxruntime gives, for a random batch of 3, the
    same outputs as three batch-1 runs of the original; otherwise the original is returned
    with False and callers fall back to runs at the fixed batch.
    """
    shape = input_shape(proto)
    if not shape or shape[0] is None:
        return proto, True
    candidate = _rewrite_batch(proto, shape[0])
    if candidate is None or not _same_outputs(proto, candidate, shape[0]):
        log.info("batch dimension cannot be freed safely; falling back to fixed-batch runs")
        return proto, False
    return candidate, True


def _rewrite_batch(proto: onnx.ModelProto, batch: int) -> onnx.ModelProto | None:
    model = _copy(proto)
    graph = model.graph
    for value in list(graph.input) + list(graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value == batch:
            dims[0].dim_param = "batch"
    del graph.value_info[:]
    initializers = initializer_map(model)
    data_dependent = data_dependent_tensors(model)
    for node in graph.node:
        if node.op_type != "Reshape" or node.input[0] not in data_dependent:
            continue
        target = initializers.get(node.input[1])
        if target is None:
            continue
        values = onnx.numpy_helper.to_array(target).copy()
        if values.size == 0 or values[0] != batch:
            continue
        copies_batch = -1 in values[1:]
        values[0] = 0 if copies_batch else -1
        if copies_batch and any(a.name == "allowzero" and a.i == 1 for a in node.attribute):
            return None
        new_name = f"{node.input[1]}__batch_free"
        if new_name not in initializers:
            initializers[new_name] = onnx.numpy_helper.from_array(values, new_name)
            graph.initializer.append(initializers[new_name])
        node.input[1] = new_name
    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:
        return None


def data_dependent_tensors(proto: onnx.ModelProto) -> set[str]:
    """Tensors whose values depend on the input's values (not only its shape)."""
    live = {i.name for i in proto.graph.input}
    for node in proto.graph.node:
        if node.op_type in ("Shape", "Size"):
            continue
        if any(name in live for name in node.input):
            live.update(node.output)
    return live


def _same_outputs(original: onnx.ModelProto, candidate: onnx.ModelProto, batch: int) -> bool:
    """The freed model on three fixed batches at once equals the original on each of them."""
    rng = np.random.default_rng(0)
    dims = tuple(d if d is not None else 1 for d in input_shape(original))
    samples = rng.random((3 * batch, *dims[1:]), dtype=np.float32)
    try:
        fixed = make_session(original)
        freed = make_session(candidate)
        name = fixed.get_inputs()[0].name
        got = freed.run(None, {name: samples})
        expected = [fixed.run(None, {name: samples[i * batch : (i + 1) * batch]}) for i in range(3)]
    except Exception as exc:
        log.debug("batched run failed: %s", exc)
        return False
    for index, outputs in enumerate(expected):
        for want, have in zip(outputs, got):
            part = have[index * batch : (index + 1) * batch]
            if have.shape[0] != 3 * batch or not np.allclose(part, want, rtol=1e-4, atol=1e-5):
                return False
    return True


# ---------------------------------------------------------------------------------------
# onnxruntime


_SUB_BYTE_TYPES = frozenset({onnx.TensorProto.INT2, onnx.TensorProto.UINT2})


def session_config(proto: onnx.ModelProto) -> tuple[tuple[str, str], ...]:
    """The session config entries onnxruntime needs to load this model at all.

    onnxruntime 1.32 fuses DequantizeLinear(int2 weight) -> Conv into QLinearConv, which
    has no int2 kernel, and refuses the session (INVALID_GRAPH); with the Q/DQ fusions
    disabled it runs the graph as written (docs/interop.md). make_session applies these
    entries itself; callers that build their own onnxruntime session pass them on.
    """
    if any(t.data_type in _SUB_BYTE_TYPES for t in proto.graph.initializer):
        return (("session.disable_quant_qdq", "1"),)
    return ()


def make_session(
    proto: onnx.ModelProto,
    *,
    optimized_model_path: str | None = None,
    config: Sequence[tuple[str, str]] = (),
    threads: int = 0,
    fuse: bool = True,
) -> onnxruntime.InferenceSession:
    """A CPU session for a model held in memory; a failure names onnxruntime's reason.

    The entries the model needs (session_config) come first; `config` adds to or
    overrides them. `threads` (else threads.session_threads(), else onnxruntime's
    default) sets the intra-op threads. `fuse=False` turns off onnxruntime's graph
    optimizations, so that every node computes its own output: with them on, a tensor's
    values change in the last bit with the set of tensors fetched (a fetched tensor blocks
    the fusion of its producer and consumer), which calibration statistics must not.
    """
    import onnxruntime as ort

    from .device import ort_providers
    from .threads import session_threads

    options = ort.SessionOptions()
    options.log_severity_level = 3
    threads = threads or session_threads() or 0
    if threads:
        options.intra_op_num_threads = threads
    # Worker threads sleep between runs instead of spinning: the tool's sessions alternate
    # with torch, which would otherwise compete with them for the same cores.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized_model_path:
        options.optimized_model_filepath = optimized_model_path
    if not fuse:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    for key, value in {**dict(session_config(proto)), **dict(config)}.items():
        options.add_session_config_entry(key, value)
    try:
        return ort.InferenceSession(
            proto.SerializeToString(), options, providers=ort_providers()
        )
    except Exception as exc:
        raise ModelError(f"onnxruntime cannot run the model: {_first_line(exc)}") from exc


def with_outputs(proto: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy that also returns the named intermediate tensors (for calibration and ANS)."""
    model = _copy(proto)
    present = {o.name for o in model.graph.output}
    infos = {v.name: v for v in model.graph.value_info}
    for name in names:
        if name in present:
            continue
        info = infos.get(name)
        if info is not None:
            model.graph.output.append(info)
        else:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
        present.add(name)
    return model


def computing_only(proto: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy whose outputs are the named tensors and that keeps only the nodes, inputs and
    initializers they need. onnxruntime runs every node of a graph whichever outputs a call
    asks for (MobileNetV2: the same 0.4 s for an early tensor as for the logits), so a
    caller that wants an early tensor many times runs this cut instead. Graphs with
    subgraphs (If, Loop, Scan) read outer names implicitly and are only given the outputs."""
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in proto.graph.node for a in n.attribute):
        return with_outputs(proto, names)
    needed = set(names)
    kept = []
    for node in reversed(proto.graph.node):
        if needed.intersection(node.output):
            kept.append(node)
            needed.update(name for name in node.input if name)
    model = _copy(proto)
    infos = {v.name: v for v in [*model.graph.input, *model.graph.value_info, *model.graph.output]}
    outputs = [infos[name] if name in infos else onnx.helper.make_empty_tensor_value_info(name) for name in names]
    inputs = [value for value in model.graph.input if value.name in needed]
    initializers = [tensor for tensor in model.graph.initializer if tensor.name in needed]
    value_info = [value for value in model.graph.value_info if value.name in needed]
    for field, values in (("node", kept[::-1]), ("input", inputs), ("output", outputs), ("initializer", initializers), ("value_info", value_info)):
        copies = [type(value)() for value in values]
        for copy, value in zip(copies, values):
            copy.CopyFrom(value)
        del getattr(model.graph, field)[:]
        getattr(model.graph, field).extend(copies)
    return model


ACTIVATION_CHUNK = 16
"""Samples per onnxruntime run where every layer's activations are fetched (ANS,
calibration, bias correction). Those of a whole batch of 64 at 224x224 held peaks of 8.2 GB
(ANS) and 6.0 GB (bias correction) on EfficientNet-Lite0 (docs/benchmarks.md, ImageNet:
peak memory). Per-sample values do not depend on the grouping: ANS ratios and calibration
histograms are the same; bias correction's float64 sums differ in rounding only."""


class Runner:
    """Runs a model in onnxruntime at any batch, returning chosen tensors.

    Models that bake a batch in are freed where provably safe (dynamic_batch); otherwise
    samples run in chunks of the fixed batch (the last one padded by repeating its final
    sample) and are stacked, so callers always pass whole batches of any size.
    """

    def __init__(
        self,
        proto: onnx.ModelProto,
        extra_outputs: Sequence[str] = (),
        config: Sequence[tuple[str, str]] = (),
        *,
        fuse: bool = True,
    ) -> None:
        """`fuse`: make_session's (False: each tensor's values whatever else is fetched)."""
        freed, self.batched = dynamic_batch(proto)
        self.fixed_batch = input_shape(proto)[0] or 1
        model = with_outputs(freed, extra_outputs) if extra_outputs else freed
        self.session = make_session(model, config=config, fuse=fuse)
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, x: np.ndarray, outputs: Sequence[str] | None = None) -> list[np.ndarray]:
        names = list(outputs) if outputs is not None else self.output_names
        if self.batched:
            return self.session.run(names, {self.input_name: x})
        size = self.fixed_batch
        parts = []
        for start in range(0, len(x), size):
            chunk = x[start : start + size]
            padded = np.concatenate([chunk, np.repeat(chunk[-1:], size - len(chunk), axis=0)])
            parts.append([out[: len(chunk)] for out in self.session.run(names, {self.input_name: padded})])
        return [np.concatenate([p[i] for p in parts]) for i in range(len(names))]
