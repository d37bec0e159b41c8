"""A corpus of bad inputs: every one ends in one line on stderr, its exit code, and no output.

Auditors feed the compiler arbitrary third-party files. Each case builds one broken input
(model file, data, plan, hardware profile or option), runs the command through click's
CliRunner and checks the contract of docs/cli.md: exactly one stderr line that starts with
'error:' and names the culprit, the documented exit code, no traceback, and an output
directory left empty (or never created).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from quanos_onnx.cli import main
from tiny_models import vgg_chain

BAD_INPUT = 1
USAGE = 2


@dataclass(frozen=True)
class Case:
    """`make(tmp)` writes the broken input and returns the command's arguments.

    `{model}`, `{data}` and `{out}` in the arguments are the good tiny model, its good data
    and the output directory; `culprit` must appear in the error line.
    """

    name: str
    make: Callable[[Path], list[str]]
    culprit: str
    exit_code: int = BAD_INPUT


def compile_args(model: str = "{model}", data: str = "{data}", *extra: str) -> list[str]:
    return ["compile", model, "--data", data, "--bits", "8", "-o", "{out}", *extra]


def good_model() -> onnx.ModelProto:
    return vgg_chain(channels=(4, 8))


def save(tmp: Path, name: str, model: onnx.ModelProto) -> str:
    path = tmp / name
    onnx.save(model, path)
    return str(path)


def write(tmp: Path, name: str, content: bytes | str) -> str:
    path = tmp / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return str(path)


def npz(tmp: Path, name: str, **arrays: np.ndarray) -> str:
    path = tmp / name
    np.savez(path, **arrays)
    return str(path)


def good_x(count: int = 8) -> np.ndarray:
    return np.random.default_rng(0).random((count, 3, 8, 8), dtype=np.float32)


def good_y(count: int = 8) -> np.ndarray:
    return np.arange(count) % 10


# -- model files ---------------------------------------------------------------------------


def model_case(name: str, model: Callable[[Path], str], culprit: str) -> Case:
    return Case(name, lambda tmp: compile_args(model(tmp)), culprit)


def truncated(tmp: Path) -> str:
    data = good_model().SerializeToString()
    return write(tmp, "truncated.onnx", data[: len(data) // 2])


def custom_op(tmp: Path) -> str:
    model = good_model()
    node = helper.make_node("Frobnicate", [model.graph.node[0].output[0]], ["frob"], name="frob", domain="com.example")
    model.graph.node.insert(1, node)
    model.graph.node[2].input[0] = "frob"
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    return save(tmp, "custom.onnx", model)


def lrn_op(tmp: Path) -> str:
    """LRN is standard ONNX that onnxruntime runs but the torch twin does not: QUANOS path only."""
    model = good_model()
    node = helper.make_node("LRN", [model.graph.node[0].output[0]], ["lrn"], name="lrn", size=3)
    model.graph.node.insert(1, node)
    model.graph.node[2].input[0] = "lrn"
    return save(tmp, "lrn.onnx", model)


def nan_weight(tmp: Path) -> str:
    model = good_model()
    weight = next(t for t in model.graph.initializer if t.name == "conv1.w")
    values = numpy_helper.to_array(weight).copy()
    values[0, 0, 0, 0] = np.nan
    weight.CopyFrom(numpy_helper.from_array(values, weight.name))
    return save(tmp, "nan_weight.onnx", model)


def without_inputs(tmp: Path) -> str:
    model = good_model()
    shape = [1, 3, 8, 8]
    model.graph.initializer.append(numpy_helper.from_array(good_x(1), "x"))
    del model.graph.input[:]
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_value = shape[0]
    return save(tmp, "no_inputs.onnx", model)


def int_input(tmp: Path) -> str:
    model = good_model()
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.INT64
    return save(tmp, "int_input.onnx", model)


def dynamic_rank(tmp: Path) -> str:
    model = good_model()
    model.graph.input[0].type.tensor_type.ClearField("shape")
    return save(tmp, "dynamic_rank.onnx", model)


def external_missing(tmp: Path) -> str:
    model = good_model()
    onnx.save(model, tmp / "external.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="external.onnx.data", size_threshold=0)
    (tmp / "external.onnx.data").unlink()
    return str(tmp / "external.onnx")


def opset_28(tmp: Path) -> str:
    model = good_model()
    model.opset_import[0].version = 28
    return save(tmp, "opset28.onnx", model)


def no_layers(tmp: Path) -> str:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")], "relu_only",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    return save(tmp, "relu_only.onnx", model)


def two_inputs(tmp: Path) -> str:
    model = good_model()
    model.graph.input.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, [1, 3]))
    return save(tmp, "two_inputs.onnx", model)


def bad_graph(tmp: Path) -> str:
    """A node reading a tensor nothing produces: the checker's business, named in one line."""
    model = good_model()
    model.graph.node[1].input[0] = "nowhere"
    return save(tmp, "dangling.onnx", model)


def tensor_proto(tmp: Path) -> str:
    return write(tmp, "tensor.onnx", numpy_helper.from_array(good_x(1), "t").SerializeToString())


def node_proto(tmp: Path) -> str:
    """Parses as a ModelProto (protobuf skips what it does not know) but holds no graph."""
    return write(tmp, "node.onnx", helper.make_node("Relu", ["x"], ["y"]).SerializeToString())


MODEL_CASES = [
    model_case("model-missing", lambda tmp: str(tmp / "absent.onnx"), "absent.onnx"),
    model_case("model-directory", lambda tmp: str(tmp), "is a directory"),
    model_case("model-empty", lambda tmp: write(tmp, "empty.onnx", b""), "empty.onnx"),
    model_case("model-truncated", truncated, "truncated.onnx"),
    model_case("model-random-bytes", lambda tmp: write(tmp, "random.onnx", np.random.default_rng(1).bytes(4096)), "random.onnx"),
    model_case("model-wrong-magic-zip", lambda tmp: write(tmp, "weights.onnx", b"PK\x03\x04" + bytes(200)), "ZIP archive"),
    model_case("model-wrong-magic-png", lambda tmp: write(tmp, "image.onnx", b"\x89PNG\r\n\x1a\n" + bytes(64)), "PNG image"),
    model_case("model-protobuf-tensor", tensor_proto, "tensor.onnx"),
    model_case("model-protobuf-not-model", node_proto, "holds no ONNX graph"),
    model_case("model-text-file", lambda tmp: write(tmp, "notes.onnx", "ir_version: 8\nthis is not protobuf\n"), "notes.onnx"),
    model_case("model-without-inputs", without_inputs, "no inputs"),
    model_case("model-non-float-input", int_input, "INT64"),
    model_case("model-dynamic-rank", dynamic_rank, "rank"),
    model_case("model-unsupported-op", custom_op, "Frobnicate"),
    Case("model-op-the-twin-lacks", lambda tmp: ["compile", lrn_op(tmp), "--data", "{data}", "-o", "{out}"], "LRN node 'lrn'"),
    model_case("model-external-data-missing", external_missing, "external.onnx.data"),
    model_case("model-opset-28", opset_28, "opset 28"),
    model_case("model-no-quantizable-layer", no_layers, "no quantizable layer"),
    model_case("model-two-inputs", two_inputs, "extra"),
    model_case("model-nan-weight", nan_weight, "conv1.w"),
    model_case("model-dangling-input", bad_graph, "nowhere"),
]

# -- data ----------------------------------------------------------------------------------


def data_case(name: str, data: Callable[[Path], str], culprit: str, *extra: str, exit_code: int = BAD_INPUT) -> Case:
    return Case(name, lambda tmp: compile_args("{model}", data(tmp), *extra), culprit, exit_code)


def nan_inputs(tmp: Path) -> str:
    x = good_x()
    x[3, 1, 2, 2] = np.nan
    return npz(tmp, "nan.npz", x=x, y=good_y())


def inf_inputs(tmp: Path) -> str:
    x = good_x()
    x[5, 0, 0, 0] = np.inf
    return npz(tmp, "inf.npz", x=x, y=good_y())


DATA_CASES = [
    data_case("data-missing", lambda tmp: str(tmp / "absent.npz"), "absent.npz"),
    data_case("data-wrong-shape", lambda tmp: npz(tmp, "shape.npz", x=good_x()[:, :, :7, :7], y=good_y()), "shape.npz"),
    data_case("data-wrong-layout", lambda tmp: npz(tmp, "nchw.npz", x=good_x(), y=good_y()), "nchw.npz", "--layout", "nhwc"),
    data_case("data-complex-dtype", lambda tmp: npz(tmp, "complex.npz", x=good_x().astype(np.complex64), y=good_y()), "complex"),
    data_case("data-string-dtype", lambda tmp: npz(tmp, "strings.npz", x=np.array(["a", "b"]), y=good_y(2)), "strings.npz"),
    data_case("data-nan", nan_inputs, "nan.npz"),
    data_case("data-inf", inf_inputs, "inf.npz"),
    data_case("data-empty", lambda tmp: npz(tmp, "empty.npz", x=good_x(0), y=good_y(0)), "empty.npz"),
    data_case("data-labels-out-of-range", lambda tmp: npz(tmp, "labels.npz", x=good_x(), y=good_y() + 5), "labels.npz"),
    data_case("data-float-labels", lambda tmp: npz(tmp, "flabels.npz", x=good_x(), y=good_y() + 0.5), "flabels.npz"),
    data_case("data-length-mismatch", lambda tmp: npz(tmp, "lengths.npz", x=good_x(8), y=good_y(5)), "lengths.npz"),
    data_case("data-not-numpy", lambda tmp: write(tmp, "fake.npz", b"not a zip at all"), "fake.npz"),
    data_case("data-unknown-format", lambda tmp: write(tmp, "data.parquet", b"PAR1"), "data.parquet"),
    data_case("data-no-x-array", lambda tmp: npz(tmp, "noarrays.npz", a=good_x(), b=good_x()), "noarrays.npz"),
    data_case("data-csv-text", lambda tmp: write(tmp, "words.csv", "a,b,c\nx,y,z\n"), "words.csv"),
    data_case("data-range-outside", lambda tmp: npz(tmp, "range.npz", x=good_x(), y=good_y()), "--data-range", "--data-range", "100:"),
]

# -- plans ---------------------------------------------------------------------------------


def plan_file(tmp: Path, document: object) -> str:
    text = document if isinstance(document, str) else json.dumps(document)
    return write(tmp, "plan.json", text)


def plan_document(**changes: object) -> dict[str, object]:
    document: dict[str, object] = {
        "format": "quanos-plan",
        "version": 1,
        "layers": [{"name": "conv0", "weight_bits": 8, "act_bits": 8}],
    }
    document.update(changes)
    return document


def plan_case(name: str, document: object, culprit: str) -> Case:
    def make(tmp: Path) -> list[str]:
        return ["compile", "{model}", "--data", "{data}", "--plan", plan_file(tmp, document), "-o", "{out}"]

    return Case(name, make, culprit)


PLAN_CASES = [
    plan_case("plan-unknown-layer", plan_document(layers=[{"name": "conv9", "weight_bits": 8}]), "conv9"),
    plan_case("plan-bits-too-low", plan_document(layers=[{"name": "conv0", "weight_bits": 1}]), "weight_bits"),
    plan_case("plan-bits-not-int", plan_document(layers=[{"name": "conv0", "weight_bits": "eight"}]), "weight_bits"),
    plan_case("plan-act-bits-too-high", plan_document(layers=[{"name": "conv0", "weight_bits": 8, "act_bits": 17}]), "act_bits"),
    plan_case("plan-wrong-version", plan_document(version=7), "version 7"),
    plan_case("plan-wrong-format", {"layers": []}, "quanos plan"),
    plan_case("plan-malformed-json", '{"format": "quanos-plan", "layers": [', "malformed JSON"),
    plan_case("plan-duplicate-layer", plan_document(layers=[{"name": "conv0", "bits": 8}, {"name": "conv0", "bits": 4}]), "conv0"),
    Case("plan-missing", lambda tmp: ["compile", "{model}", "--data", "{data}", "--plan", str(tmp / "nope.json"), "-o", "{out}"], "nope.json"),
]

# -- hardware profiles ---------------------------------------------------------------------


def profile_case(name: str, document: object, culprit: str) -> Case:
    def make(tmp: Path) -> list[str]:
        text = document if isinstance(document, str) else json.dumps(document)
        return ["energy", "{model}", "--hw", write(tmp, "profile.json", text), "-o", "{out}"]

    return Case(name, make, culprit)


def profile_document(**changes: object) -> dict[str, object]:
    document: dict[str, object] = {
        "format": "quanos-hardware-profile",
        "version": 1,
        "name": "mine",
        "access_pj_per_bit": 2.5,
        "mac_multiply_pj": 3.1,
        "mac_multiply_reference_bits": 32,
        "mac_add_pj": 0.1,
    }
    document.update(changes)
    return document


PROFILE_CASES = [
    profile_case("profile-negative-energy", profile_document(access_pj_per_bit=-1), "access_pj_per_bit"),
    profile_case("profile-string-field", profile_document(mac_add_pj="cheap"), "mac_add_pj"),
    profile_case("profile-unknown-field", profile_document(voltage=0.9), "voltage"),
    profile_case("profile-missing-field", {k: v for k, v in profile_document().items() if k != "mac_add_pj"}, "mac_add_pj"),
    profile_case("profile-malformed-json", "{nope", "profile.json"),
    Case("profile-unknown-name", lambda tmp: ["energy", "{model}", "--hw", "quantum"], "quantum"),
]

# -- options -------------------------------------------------------------------------------


def quanos_args(*extra: str) -> Callable[[Path], list[str]]:
    return lambda tmp: ["compile", "{model}", "--data", "{data}", "-o", "{out}", *extra]


def file_as_parent(tmp: Path) -> list[str]:
    write(tmp, "a_file", b"x")
    return ["compile", "{model}", "--data", "{data}", "--bits", "8", "-o", str(tmp / "a_file" / "out")]


OPTION_CASES = [
    Case("option-eps-too-large", quanos_args("--eps", "2"), "--eps", USAGE),
    Case("option-eps-zero", quanos_args("--eps", "0"), "--eps", USAGE),
    Case("option-eps-not-a-number", quanos_args("--eps", "lots"), "--eps", USAGE),
    Case("option-samples-zero", quanos_args("--samples", "0"), "--samples", USAGE),
    Case("option-samples-too-many", quanos_args("--samples", "999"), "--samples"),
    Case("option-rounds-zero", quanos_args("--rounds", "0"), "--rounds", USAGE),
    Case("option-pgd-steps-zero", lambda tmp: ["analyze", "{model}", "--data", "{data}", "--attack", "pgd", "--pgd-steps", "0", "-o", "{out}"], "--pgd-steps", USAGE),
    Case("option-k-min-above-k-init", quanos_args("--k-min", "9", "--k-init", "8"), "--k-min", USAGE),
    Case("option-bits-out-of-range", lambda tmp: compile_args()[:-2] + ["-o", "{out}", "--bits", "17"], "--bits", USAGE),
    Case("option-bits-and-plan", lambda tmp: compile_args("{model}", "{data}", "--plan", plan_file(tmp, plan_document())), "--plan", USAGE),
    Case("option-calibration-samples-zero", lambda tmp: compile_args("{model}", "{data}", "--calibration-samples", "0"), "--calibration-samples", USAGE),
    Case("option-batch-size-zero", lambda tmp: compile_args("{model}", "{data}", "--batch-size", "0"), "--batch-size", USAGE),
    Case("option-input-range-reversed", quanos_args("--input-range", "1,0"), "--input-range", USAGE),
    Case("option-no-data", lambda tmp: ["compile", "{model}", "--bits", "8", "-o", "{out}"], "--data", USAGE),
    Case("option-output-is-input", lambda tmp: ["compile", "{model}", "--data", "{data}", "--bits", "8", "-o", "{model}"], "tiny.onnx"),
    Case("option-output-under-a-file", file_as_parent, "a_file"),
    Case("option-unknown-option", lambda tmp: compile_args("{model}", "{data}", "--bitz", "3"), "--bitz", USAGE),
    Case("option-bad-choice", lambda tmp: compile_args("{model}", "{data}", "--layout", "nwhc"), "--layout", USAGE),
    Case("option-not-an-int", lambda tmp: compile_args("{model}", "{data}", "--samples", "many"), "--samples", USAGE),
    Case("option-missing-argument", lambda tmp: ["compile", "--data", "{data}", "-o", "{out}"], "MODEL", USAGE),
    Case("option-unknown-command", lambda tmp: ["compiel", "{model}"], "compiel", USAGE),
    Case("option-analyze-audit-eps", lambda tmp: ["analyze", "{model}", "--data", "{data}", "--audit-eps", "0.1,3", "-o", "{out}"], "--audit-eps", USAGE),
    Case("option-energy-plan-unknown-layer", lambda tmp: ["energy", "{model}", "--plan", plan_file(tmp, plan_document(layers=[{"name": "fc", "bits": 4}])), "-o", "{out}"], "fc"),
]

CASES = [*MODEL_CASES, *DATA_CASES, *PLAN_CASES, *PROFILE_CASES, *OPTION_CASES]


def test_the_corpus_is_large_enough() -> None:
    assert len(CASES) >= 30
    assert len({case.name for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_gives_one_line_and_no_output(case: Case, tmp_path: Path) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    model = save(inputs, "tiny.onnx", good_model())
    data = npz(inputs, "good.npz", x=good_x(), y=good_y())
    out = tmp_path / "out"
    args = [a.format(model=model, data=data, out=out) for a in case.make(inputs)]

    result = CliRunner().invoke(main, args)

    lines = result.stderr.splitlines()
    assert result.exit_code == case.exit_code, result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert case.culprit in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert result.stdout == ""
    assert not out.exists() or not any(out.iterdir())
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)
