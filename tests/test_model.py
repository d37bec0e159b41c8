"""model.py: loading real-world exports into one normal form, saving safely, batching."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from quanos_onnx.errors import ModelError, OutputError
from quanos_onnx.model import (
    computing_only,
    TARGET_OPSET,
    Runner,
    check_finite_outputs,
    default_opset,
    dynamic_batch,
    fix_input_shape,
    load_model,
    normalize,
    num_classes,
    refuse_quantized,
    save_model,
    with_outputs,
)

from tiny_models import dynamic_size_classifier, random_inputs, vgg_chain


def _ort_outputs(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: sample[None]})[0] for sample in x])


def _opset8_model() -> onnx.ModelProto:
    """A CNTK-style opset-8 model: Constant weight, separate bias Add, Reshape [1,-1],
    MatMul classifier, nameless nodes and every initializer also listed as an input."""
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(4, 1, 3, 3)).astype(np.float32)
    initializers = [
        numpy_helper.from_array(rng.normal(size=(1, 4, 1, 1)).astype(np.float32), "bias"),
        numpy_helper.from_array(np.array([1, -1], np.int64), "flat_shape"),
        numpy_helper.from_array(rng.normal(size=(4 * 6 * 6, 10)).astype(np.float32), "fc"),
    ]
    nodes = [
        helper.make_node("Constant", [], ["weight"], value=numpy_helper.from_array(weight, "weight")),
        helper.make_node("Conv", ["x", "weight"], ["conv"], kernel_shape=[3, 3]),
        helper.make_node("Add", ["conv", "bias"], ["biased"]),
        helper.make_node("Relu", ["biased"], ["relu"]),
        helper.make_node("Reshape", ["relu", "flat_shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "fc"], ["logits"]),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])]
    inputs += [helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in initializers]
    graph = helper.make_graph(
        nodes, "cntk", inputs, [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])], initializers
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)])
    model.ir_version = 3
    onnx.checker.check_model(model)
    return model


def test_opset8_model_is_upgraded_and_computes_the_same():
    original = _opset8_model()
    normal = normalize(original)
    assert default_opset(normal) == TARGET_OPSET
    assert normal.ir_version >= 10
    x = np.random.default_rng(1).random((4, 1, 8, 8), dtype=np.float32)
    np.testing.assert_allclose(_ort_outputs(normal, x), _ort_outputs(original, x), rtol=1e-5, atol=1e-5)


def test_constant_node_weights_become_initializers():
    normal = normalize(_opset8_model())
    assert "Constant" not in {node.op_type for node in normal.graph.node}
    conv = next(node for node in normal.graph.node if node.op_type == "Conv")
    initializers = {t.name for t in normal.graph.initializer}
    assert conv.input[1] in initializers


def test_initializers_listed_as_inputs_are_stripped():
    normal = normalize(_opset8_model())
    assert [i.name for i in normal.graph.input] == ["x"]


def _named_model(names: list[str]) -> onnx.ModelProto:
    nodes = [helper.make_node("Relu", ["x"], ["r0"], name=names[0])]
    for index, name in enumerate(names[1:], start=1):
        nodes.append(helper.make_node("Relu", [f"r{index - 1}"], [f"r{index}"], name=name))
    graph = helper.make_graph(
        nodes,
        "names",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info(f"r{len(names) - 1}", TensorProto.FLOAT, [1, 4])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", TARGET_OPSET)])


def test_nameless_and_duplicate_node_names_become_unique_and_stable():
    model = _named_model(["", "act_2", "act", "act", "Relu_0", "", "keep"])
    first = [node.name for node in normalize(model).graph.node]
    second = [node.name for node in normalize(model).graph.node]
    assert first == second
    assert len(set(first)) == len(first)
    assert all(first)
    assert first[1:3] == ["act_2", "act"] and first[4] == "Relu_0" and first[-1] == "keep"


def test_named_layers_keep_their_names():
    normal = normalize(vgg_chain())
    names = [node.name for node in normal.graph.node if node.op_type == "Conv"]
    assert names == ["conv0", "conv1", "conv2", "conv3"]


def test_external_data_is_loaded(tmp_path: Path):
    model = vgg_chain()
    path = tmp_path / "external.onnx"
    onnx.save(vgg_chain(), path, save_as_external_data=True, location="weights.bin", size_threshold=0)
    assert (tmp_path / "weights.bin").is_file()
    loaded = load_model(path)
    x = np.random.default_rng(0).random((2, 3, 8, 8), dtype=np.float32)
    np.testing.assert_allclose(_ort_outputs(loaded, x), _ort_outputs(model, x), rtol=1e-5, atol=1e-5)


def test_missing_external_data_names_the_file(tmp_path: Path):
    path = tmp_path / "external.onnx"
    onnx.save(vgg_chain(), path, save_as_external_data=True, location="weights.bin", size_threshold=0)
    (tmp_path / "weights.bin").unlink()
    with pytest.raises(ModelError, match="weights.bin"):
        load_model(path)


@pytest.mark.parametrize(
    ("content", "reason"),
    [(None, "not found"), (b"", "empty"), (b"this is plain text, not a protobuf\n", "ONNX")],
)
def test_unreadable_files_are_model_errors_naming_the_path(tmp_path: Path, content: bytes | None, reason: str):
    path = tmp_path / "model.onnx"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ModelError, match=reason) as caught:
        load_model(path)
    assert str(path) in str(caught.value)


def test_truncated_model_is_a_model_error(tmp_path: Path):
    data = vgg_chain().SerializeToString()
    path = tmp_path / "truncated.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="truncated.onnx"):
        load_model(path)


def test_save_writes_a_loadable_model_and_no_temp_file(tmp_path: Path):
    target = tmp_path / "out" / "model.onnx"
    save_model(vgg_chain(), target)
    assert onnx.load(target).graph.node
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.onnx"]


def test_save_refuses_to_overwrite_the_input(tmp_path: Path):
    source = tmp_path / "model.onnx"
    onnx.save(vgg_chain(), source)
    before = source.read_bytes()
    with pytest.raises(OutputError, match="overwrite"):
        save_model(vgg_chain(seed=1), tmp_path / "." / "model.onnx", protect=[source])
    assert source.read_bytes() == before


def test_failed_save_keeps_the_old_file_and_leaves_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"old")

    def failing_replace(source: str, destination: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OutputError, match="model.onnx"):
        save_model(vgg_chain(), target)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def _batch_one_reshape_model() -> onnx.ModelProto:
    """Exported at batch 1 with the batch baked into a Reshape target [1, -1]."""
    model = normalize(_opset8_model())
    assert any(node.op_type == "Reshape" for node in model.graph.node)
    return model


def test_dynamic_batch_frees_a_baked_in_reshape():
    model = _batch_one_reshape_model()
    freed, batched = dynamic_batch(model)
    assert batched
    assert freed.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    x = np.random.default_rng(2).random((5, 1, 8, 8), dtype=np.float32)
    session = ort.InferenceSession(freed.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x})[0]
    np.testing.assert_allclose(got, _ort_outputs(model, x), rtol=1e-5, atol=1e-5)


def _batch_mixing_model() -> onnx.ModelProto:
    """Batch 1 with a reduction over the batch axis: freeing the batch would change results."""
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["x"], ["mean"], name="mean", keepdims=1, axes=[0]),
            helper.make_node("Sub", ["x", "mean"], ["centered"], name="center"),
            helper.make_node("Flatten", ["centered"], ["y"], name="flatten"),
        ],
        "mix",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6])],
    )
    return normalize(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_dynamic_batch_refuses_a_model_that_mixes_samples():
    model = _batch_mixing_model()
    same, batched = dynamic_batch(model)
    assert not batched
    assert same is model


@pytest.mark.parametrize("build", [_batch_one_reshape_model, _batch_mixing_model])
def test_runner_runs_whole_batches_either_way(build):
    model = build()
    dims = tuple(d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:])
    x = np.random.default_rng(3).random((7, *dims), dtype=np.float32)
    runner = Runner(model)
    (got,) = runner.run(x)
    assert got.shape[0] == 7
    np.testing.assert_allclose(got, _ort_outputs(model, x), rtol=1e-5, atol=1e-5)


def test_runner_returns_requested_intermediate_tensors():
    model = normalize(vgg_chain())
    relu = next(node.output[0] for node in model.graph.node if node.op_type == "Relu")
    x = np.random.default_rng(4).random((3, 3, 8, 8), dtype=np.float32)
    runner = Runner(model, [relu])
    logits, activation = runner.run(x, [model.graph.output[0].name, relu])
    assert logits.shape == (3, 10)
    assert activation.shape == (3, 4, 8, 8) and activation.min() >= 0.0


def _dynamo_style_model() -> onnx.ModelProto:
    """torch's dynamo exporter writes Reshape(allowzero=1) to a static [1, features] target,
    and reuses one target for several Reshapes."""
    target = numpy_helper.from_array(np.array([1, 12], np.int64), "target")
    graph = helper.make_graph(
        [
            helper.make_node("Relu", ["x"], ["r"], name="relu"),
            helper.make_node("Reshape", ["r", "target"], ["flat"], name="view", allowzero=1),
            helper.make_node("Reshape", ["x", "target"], ["flat_x"], name="view_x", allowzero=1),
            helper.make_node("Add", ["flat", "flat_x"], ["y"], name="add"),
        ],
        "dynamo",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 12])],
        [target],
    )
    return normalize(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


def test_dynamic_batch_frees_a_dynamo_style_static_reshape():
    model = _dynamo_style_model()
    assert dynamic_batch(model)[1]
    x = np.random.default_rng(5).normal(size=(4, 3, 2, 2)).astype(np.float32)
    (got,) = Runner(model).run(x)
    np.testing.assert_allclose(got, _ort_outputs(model, x), rtol=1e-6)


def test_a_fixed_batch_larger_than_one_is_freed():
    from onnx import helper, numpy_helper

    from quanos_onnx.model import Runner, normalize

    weight = np.random.default_rng(0).normal(size=(12, 5)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Reshape", ["x", "shape"], ["flat"], name="flatten"),
            helper.make_node("MatMul", ["flat", "w"], ["y"], name="fc"),
        ],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 5])],
        [numpy_helper.from_array(np.array([2, 12], dtype=np.int64), "shape"), numpy_helper.from_array(weight, "w")],
    )
    model = normalize(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    x = np.random.default_rng(1).random((7, 3, 4), dtype=np.float32)
    (out,) = Runner(model).run(x)
    np.testing.assert_allclose(out, x.reshape(7, 12) @ weight, rtol=1e-5)


def test_a_fixed_batch_that_cannot_be_freed_runs_in_padded_chunks():
    from onnx import helper, numpy_helper

    from quanos_onnx.model import Runner, normalize

    offsets = np.arange(6, dtype=np.float32).reshape(2, 3)  # a per-position constant: batch 2 is baked in
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "offsets"], ["y"], name="add")],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3])],
        [numpy_helper.from_array(offsets, "offsets")],
    )
    model = normalize(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    runner = Runner(model)
    assert not runner.batched
    x = np.random.default_rng(1).random((5, 3), dtype=np.float32)
    (out,) = runner.run(x)
    expected = x + np.concatenate([offsets, offsets, offsets[:1]])
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_refuse_quantized_names_the_first_quantization_node() -> None:
    model = vgg_chain(channels=(4, 8))
    model.graph.initializer.extend([numpy_helper.from_array(np.float32(0.1), "s"), numpy_helper.from_array(np.uint8(0), "z")])
    model.graph.node.insert(0, helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q"))
    model.graph.node.insert(1, helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dq"))
    model.graph.node[2].input[0] = "xd"
    with pytest.raises(ModelError, match=r"already quantized \(2 quantization node\(s\), the first 'q' \(QuantizeLinear\)\)"):
        refuse_quantized(model, "m.onnx")
    refuse_quantized(vgg_chain(channels=(4, 8)), "float.onnx")


def test_num_classes_refuses_an_output_that_is_not_n_by_classes() -> None:
    model = vgg_chain(channels=(4, 8))
    assert num_classes(model) == 10
    model.graph.output[0].type.tensor_type.shape.dim.add().dim_value = 1
    with pytest.raises(ModelError, match=r"m.onnx: output 'classifier_out' has shape \[Nx10x1\]"):
        num_classes(model, "m.onnx")


def test_check_finite_outputs_names_the_output() -> None:
    model = normalize(vgg_chain(channels=(4, 8)))
    x = np.random.default_rng(0).random((4, 3, 8, 8), dtype=np.float32)
    check_finite_outputs(model, x, "m.onnx")
    with pytest.raises(ModelError, match="output 'classifier_out' is NaN or inf on 1 of the first 4"):
        check_finite_outputs(model, np.where(np.arange(4)[:, None, None, None] == 2, np.inf, x).astype(np.float32), "m.onnx")


def test_normalize_names_cycles_short_weights_and_double_producers() -> None:
    cycle = vgg_chain(channels=(4, 8))
    cycle.graph.node[0].input[0] = "relu2_out"
    with pytest.raises(ModelError, match="the graph has a cycle: 'relu1' -> 'conv1' -> 'relu2' -> 'conv0' -> 'relu1'$"):
        normalize(cycle, "m.onnx")
    short = vgg_chain(channels=(4, 8))
    weight = next(t for t in short.graph.initializer if t.name == "conv0.w")
    weight.raw_data = weight.raw_data[:4]
    with pytest.raises(ModelError, match="initializer 'conv0.w' has 4 bytes of data, but its shape"):
        normalize(short, "m.onnx")
    twice = vgg_chain(channels=(4, 8))
    twice.graph.node.append(helper.make_node("Relu", ["x"], ["conv0_out"], name="again"))
    with pytest.raises(ModelError, match="tensor 'conv0_out' is produced twice, by node 'conv0' and by node 'again'"):
        normalize(twice, "m.onnx")


def test_external_data_outside_the_folder_is_refused_from_its_name_alone(tmp_path: Path) -> None:
    onnx.save(vgg_chain(channels=(4, 8)), tmp_path / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0)
    model = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    for location in ("../m.data", "/etc/hostname", "sub/../../m.data"):
        for tensor in model.graph.initializer:
            next(e for e in tensor.external_data if e.key == "location").value = location
        onnx.save(model, tmp_path / "m.onnx")
        with pytest.raises(ModelError, match=f"refers to external data '{location}', outside the model's folder"):
            load_model(tmp_path / "m.onnx")


def test_fix_input_shape_fixes_dynamic_dims_and_keeps_the_batch_dynamic():
    from quanos_onnx.layers import list_layers

    model = normalize(dynamic_size_classifier(5))
    with pytest.raises(ModelError, match="input-shape|cannot be inferred"):
        list_layers(model)
    for given in ((3, 12, 10), (1, 3, 12, 10)):
        fixed = fix_input_shape(model, given)
        dims = fixed.graph.input[0].type.tensor_type.shape.dim
        assert [d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims] == ["N", 3, 12, 10]
        conv = next(layer for layer in list_layers(fixed) if layer.name == "conv")
        assert conv.macs == 4 * 3 * 9 * 12 * 10
        x = np.random.default_rng(1).random((2, 3, 12, 10), np.float32)
        np.testing.assert_allclose(_ort_outputs(fixed, x), _ort_outputs(model, x), rtol=1e-6)
    assert fix_input_shape(model, None) is model


def test_fix_input_shape_refuses_a_wrong_rank_or_a_fixed_dim():
    from quanos_onnx.errors import UsageError

    model = normalize(dynamic_size_classifier(5))
    with pytest.raises(UsageError, match="input_shape 12x10 has 2 dims; .* has 4"):
        fix_input_shape(model, (12, 10))
    with pytest.raises(UsageError, match="size 3 in dimension 1, not 4"):
        fix_input_shape(model, (4, 12, 10))


def test_a_model_cut_to_an_early_tensor_computes_it_alone():
    model = normalize(vgg_chain(seed=1))
    early = next(node for node in model.graph.node if node.op_type == "Relu").output[0]
    cut = computing_only(model, [early])
    onnx.checker.check_model(cut)
    assert [output.name for output in cut.graph.output] == [early]
    assert 0 < len(cut.graph.node) < len(model.graph.node) / 2
    kept = {name for node in cut.graph.node for name in node.input}
    assert {tensor.name for tensor in cut.graph.initializer} <= kept
    x = random_inputs(model, 2)
    expected = Runner(with_outputs(model, [early]), [early]).run(x, [early])[0]
    np.testing.assert_array_equal(Runner(cut, [early]).run(x, [early])[0], expected)


def test_a_model_with_subgraphs_is_not_cut():
    """If/Loop bodies read outer tensors without naming them as node inputs."""
    then_branch = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["then_out"])], "then", [], [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, None)]
    )
    else_branch = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["else_out"])], "else", [], [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, None)]
    )
    graph = helper.make_graph(
        [
            helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
            helper.make_node("Greater", ["total", "zero"], ["positive"]),
            helper.make_node("If", ["positive"], ["y"], then_branch=then_branch, else_branch=else_branch),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.zeros((), np.float32), "zero")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    cut = computing_only(model, ["total"])
    assert len(cut.graph.node) == 3
    assert [output.name for output in cut.graph.output] == ["y", "total"]
