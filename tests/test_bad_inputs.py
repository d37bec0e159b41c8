"""A corpus of bad inputs: every one ends in one line on stderr, its exit code, and no output.

Auditors feed the compiler arbitrary third-party files. Each case builds one broken input
(model file, data, plan, hardware profile or option), runs the command through click's
CliRunner and checks the contract of docs/cli.md: exactly one stderr line that starts with
'error:' and names the culprit, the documented exit code, no traceback, and an output
directory left empty (or never created).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from quanos_onnx import data as data_module
from quanos_onnx import outputs
from quanos_onnx.commands import compile as compile_room
from quanos_onnx import inputs as inputs_module
from quanos_onnx.cli import main
from tiny_models import GraphBuilder, vgg_chain

BAD_INPUT = 1
USAGE = 2
WRITTEN = 3


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
    patch: Callable[[pytest.MonkeyPatch], None] | None = None


@contextmanager
def hang_guard(seconds: int = 120) -> Iterator[None]:
    """Fail a case that blocks (a named pipe opened for reading) instead of hanging the suite."""

    def hung(signum: int, frame: object) -> None:
        raise TimeoutError(f"the command blocked for {seconds} s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


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
    Case("option-max-accuracy-drop-negative", lambda tmp: compile_args("{model}", "{data}", "--max-accuracy-drop", "-1"), "--max-accuracy-drop", USAGE),
    Case("option-eval-fraction-above-one", lambda tmp: compile_args("{model}", "{data}", "--eval-fraction", "1.5"), "--eval-fraction", USAGE),
    Case("option-eval-attacks-unknown", lambda tmp: compile_args("{model}", "{data}", "--eval-attacks", "fgsm,cw"), "--eval-attacks", USAGE),
    Case("option-eval-samples-zero", lambda tmp: compile_args("{model}", "{data}", "--eval-samples", "0"), "--eval-samples", USAGE),
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

# -- special files: refused at once, never opened (a named pipe would block forever) ------


def fifo(tmp: Path, name: str) -> str:
    os.mkfifo(tmp / name)
    return str(tmp / name)


SPECIAL_FILE_CASES = [
    model_case("model-named-pipe", lambda tmp: fifo(tmp, "model.onnx"), "not a regular file (a named pipe)"),
    data_case("data-named-pipe", lambda tmp: fifo(tmp, "data.npz"), "not a regular file (a named pipe)"),
    data_case("data-csv-dev-zero", lambda tmp: "/dev/zero", "/dev/zero: not a regular file (a device)"),
    Case("plan-named-pipe", lambda tmp: ["compile", "{model}", "--data", "{data}", "--plan", fifo(tmp, "plan.json"), "-o", "{out}"], "not a regular file (a named pipe)"),
    Case("plan-dev-zero", lambda tmp: ["compile", "{model}", "--data", "{data}", "--plan", "/dev/zero", "-o", "{out}"], "/dev/zero: not a regular file (a device)"),
    Case("profile-named-pipe", lambda tmp: ["energy", "{model}", "--hw", fifo(tmp, "profile.json"), "-o", "{out}"], "not a regular file (a named pipe)"),
    Case("output-named-pipe", lambda tmp: compile_args()[:-1] + [fifo(tmp, "out_pipe")], "is a named pipe"),
    Case("export-output-named-pipe", lambda tmp: ["export", "{model}", "--to", "qonnx", "-o", fifo(tmp, "export_pipe")], "is a named pipe, not a regular file"),
    Case("finetune-output-named-pipe", lambda tmp: ["finetune", "{model}", "--data", "{data}", "--epochs", "1", "-o", fifo(tmp, "ft_pipe")], "is a named pipe, not a regular file"),
]

# -- inputs that used to give silent wrong answers -----------------------------------------


def model_with(tmp: Path, name: str, change: Callable[[onnx.ModelProto], None]) -> str:
    model = good_model()
    change(model)
    return save(tmp, name, model)


def nan_output(model: onnx.ModelProto) -> None:
    """Log of the logits: NaN wherever a logit is negative, a valid graph otherwise."""
    model.graph.node[-1].output[0] = "logits"
    model.graph.node.append(helper.make_node("Log", ["logits"], ["classifier_out"], name="log"))


def four_d_output(tmp: Path) -> str:
    builder = GraphBuilder(0)
    features = builder.relu(builder.conv("x", 3, 4, name="conv0"))
    return save(tmp, "feature_map.onnx", builder.model(["N", 3, 8, 8], features))


def qdq_model(tmp: Path) -> str:
    """An already-quantized model: QuantizeLinear -> DequantizeLinear before the first conv."""
    model = good_model()
    model.graph.initializer.extend([numpy_helper.from_array(np.float32(1 / 255), "s"), numpy_helper.from_array(np.uint8(0), "z")])
    model.graph.node.insert(0, helper.make_node("QuantizeLinear", ["x", "s", "z"], ["x_q"], name="quant_x"))
    model.graph.node.insert(1, helper.make_node("DequantizeLinear", ["x_q", "s", "z"], ["x_dq"], name="dequant_x"))
    model.graph.node[2].input[0] = "x_dq"
    return save(tmp, "qdq.onnx", model)


def plan_with_string_boolean(tmp: Path) -> list[str]:
    plan = plan_file(tmp, plan_document(layers=[{"name": "conv0", "keep_float": "false", "bits": 8}]))
    return ["compile", "{model}", "--data", "{data}", "--plan", plan, "-o", "{out}"]


def finetune_args(*extra: str) -> Callable[[Path], list[str]]:
    def make(tmp: Path) -> list[str]:
        plan = plan_file(tmp, plan_document())
        return ["finetune", "{model}", "--plan", plan, "--data", "{data}", "--epochs", "1", "-o", "{out}/ft.onnx", *extra]

    return make


SILENT_ANSWER_CASES = [
    plan_case("plan-keep-float-as-string", plan_document(layers=[{"name": "conv0", "keep_float": "false", "bits": 8}]), "keep_float"),
    Case("finetune-lr-inf", finetune_args("--lr", "inf"), "--lr inf", USAGE),
    model_case("model-nan-output", lambda tmp: model_with(tmp, "nan_out.onnx", nan_output), "output 'classifier_out' is NaN or inf"),
    model_case("model-already-quantized", qdq_model, "already quantized"),
    model_case("model-4d-output", four_d_output, "[N, classes]"),
    Case("data-0-255-floats-under-attack", lambda tmp: ["compile", "{model}", "--data", npz(tmp, "raw.npz", x=good_x() * 255, y=good_y()), "-o", "{out}"], "outside --input-range 0,1"),
]

# -- bad input that used to be an "internal error" ------------------------------------------


def dims_model(size: int) -> Callable[[Path], str]:
    def make(tmp: Path) -> str:
        def change(model: onnx.ModelProto) -> None:
            model.graph.input[0].type.tensor_type.shape.dim[2].dim_value = size

        return model_with(tmp, f"dim{size}.onnx", change)

    return make


def two_producers(model: onnx.ModelProto) -> None:
    model.graph.node.insert(2, helper.make_node("Relu", ["x"], ["relu1_out"], name="again"))


def image_folder(tmp: Path, size: int) -> str:
    from PIL import Image

    for label in ("a", "b"):
        (tmp / "images" / label).mkdir(parents=True)
        Image.new("RGB", (size, size)).save(tmp / "images" / label / "0.png")
    return str(tmp / "images")


def pillow_limit(limit: int) -> Callable[[pytest.MonkeyPatch], None]:
    def patch(monkeypatch: pytest.MonkeyPatch) -> None:
        from PIL import Image

        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)

    return patch


def deep_plan(tmp: Path) -> list[str]:
    text = '{"format": "quanos-plan", "version": 1, "details": ' + "[" * 200_000 + "]" * 200_000 + "}"
    return ["compile", "{model}", "--data", "{data}", "--plan", write(tmp, "deep.json", text), "-o", "{out}"]


INTERNAL_ERROR_CASES = [
    Case("data-image-over-pillow-bomb-limit", lambda tmp: compile_args("{model}", image_folder(tmp, 8)), "0.png", patch=pillow_limit(20)),
    Case("data-image-over-the-pixel-limit", lambda tmp: compile_args("{model}", image_folder(tmp, 8)), "over the limit of 50", patch=lambda mp: mp.setattr(data_module, "MAX_IMAGE_PIXELS", 50)),
    model_case("model-input-dim-minus-1", dims_model(-1), "size -1 in dimension 2"),
    model_case("model-input-dim-0", dims_model(0), "size 0 in dimension 2"),
    model_case("model-two-producers", lambda tmp: model_with(tmp, "twice.onnx", two_producers), "tensor 'relu1_out' is produced twice"),
    Case("option-seed-2-to-the-64", quanos_args("--bits", "8", "--seed", str(2**64)), "--seed", USAGE),
    Case("plan-200000-deep", deep_plan, "nested deeper than"),
    profile_case("profile-overflows-to-inf", profile_document(access_pj_per_bit=1e308), "access_pj_per_bit"),
]

# -- messages: short, naming the culprit, escaped, and the same whatever exists outside ------


def cycle(model: onnx.ModelProto) -> None:
    model.graph.node[0].input[0] = "relu2_out"


def short_weight(model: onnx.ModelProto) -> None:
    weight = next(t for t in model.graph.initializer if t.name == "conv1.w")
    weight.raw_data = weight.raw_data[:-8]


def contrib_op(model: onnx.ModelProto) -> None:
    model.graph.node[1].op_type, model.graph.node[1].domain = "Gelu", "com.microsoft"
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def control_characters(model: onnx.ModelProto) -> None:
    custom = model.graph.node[1]
    custom.op_type, custom.domain, custom.name = "Frob", "com.example", "evil\x1b[31mred\u202e"
    model.opset_import.append(helper.make_opsetid("com.example", 1))


MESSAGE_CASES = [
    model_case("model-cycle", lambda tmp: model_with(tmp, "cycle.onnx", cycle), "cycle: 'relu1' -> 'conv1' -> 'relu2' -> 'conv0' -> 'relu1'"),
    model_case("model-short-weight", lambda tmp: model_with(tmp, "short.onnx", short_weight), "'conv1.w' has 1144 bytes of data, but its shape [8, 4, 3, 3] needs 1152"),
    model_case("model-contrib-op", lambda tmp: model_with(tmp, "gelu.onnx", contrib_op), "contrib op 'com.microsoft:Gelu'"),
    model_case("model-control-characters", lambda tmp: model_with(tmp, "ctrl.onnx", control_characters), "evil\\x1b[31mred\\u202e"),
]

# -- limits ----------------------------------------------------------------------------------

LIMIT_CASES = [
    Case(
        "plan-over-the-size-limit",
        lambda tmp: ["compile", "{model}", "--data", "{data}", "--plan", plan_file(tmp, plan_document(details={"pad": "x" * 4096})), "-o", "{out}"],
        "larger than the",
        patch=lambda mp: mp.setattr(inputs_module, "MAX_DOCUMENT_BYTES", 2048),
    ),
    Case(
        "data-npz-member-over-the-limit",
        lambda tmp: compile_args("{model}", npz(tmp, "bomb.npz", x=np.zeros((64, 3, 8, 8), np.float32), y=good_y(64))),
        "'x' in",
        patch=lambda mp: mp.setattr(data_module, "MAX_ARRAY_BYTES", 4096),
    ),
]

CASES = [
    *MODEL_CASES, *DATA_CASES, *PLAN_CASES, *PROFILE_CASES, *OPTION_CASES,
    *SPECIAL_FILE_CASES, *SILENT_ANSWER_CASES, *INTERNAL_ERROR_CASES, *MESSAGE_CASES, *LIMIT_CASES,
]


def test_the_corpus_is_large_enough() -> None:
    assert len(CASES) >= 30
    assert len({case.name for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_gives_one_line_and_no_output(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if case.patch is not None:
        case.patch(monkeypatch)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    model = save(inputs, "tiny.onnx", good_model())
    data = npz(inputs, "good.npz", x=good_x(), y=good_y())
    out = tmp_path / "out"
    args = [a.format(model=model, data=data, out=out) for a in case.make(inputs)]

    with hang_guard():
        result = CliRunner().invoke(main, args)

    lines = result.stderr.splitlines()
    assert result.exit_code == case.exit_code, result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert case.culprit in lines[0], lines[0]
    assert len(lines[0]) < 400 and lines[0].isprintable(), lines[0]
    assert "Traceback" not in result.output
    assert result.stdout == ""
    assert not out.exists() or not any(out.iterdir())
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)


# -- existing outputs: replaced only by a complete run, never lost -------------------------


@pytest.fixture()
def tiny_inputs(tmp_path: Path) -> tuple[str, str]:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    return save(inputs, "tiny.onnx", good_model()), npz(inputs, "good.npz", x=good_x(), y=good_y())


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def disk_full_on(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = outputs.write_file_bytes

    def write(target: Path, data: bytes) -> None:
        if target.name == name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write(target, data)

    monkeypatch.setattr(outputs, "write_file_bytes", write)


def test_a_disk_full_during_report_html_keeps_the_previous_run(
    tiny_inputs: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, data = tiny_inputs
    out = tmp_path / "out"
    assert CliRunner().invoke(main, ["compile", model, "--data", data, "--bits", "8", "-o", str(out)]).exit_code == 0
    before = folder_bytes(tmp_path)
    disk_full_on("report.html", monkeypatch)
    result = CliRunner().invoke(main, ["compile", model, "--data", data, "--bits", "4", "-o", str(out)])
    assert result.exit_code == BAD_INPUT
    assert result.stderr.splitlines() == [result.stderr.strip()] and "report.html: cannot write: No space left on device" in result.stderr
    assert folder_bytes(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs", "out"]


def test_a_disk_full_below_new_folders_leaves_no_folders(tiny_inputs: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, data = tiny_inputs
    disk_full_on("plan.json", monkeypatch)
    result = CliRunner().invoke(main, ["compile", model, "--data", data, "--bits", "8", "-o", str(tmp_path / "a" / "b" / "out")])
    assert result.exit_code == BAD_INPUT, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs"]


def test_a_plan_inside_the_output_folder_is_refused_before_any_work(
    tiny_inputs: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, data = tiny_inputs
    out = tmp_path / "out"
    assert CliRunner().invoke(main, ["compile", model, "--data", data, "--bits", "8", "-o", str(out)]).exit_code == 0
    before = folder_bytes(out)

    def no_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(compile_room, "read_model", no_work)
    result = CliRunner().invoke(main, ["compile", model, "--data", data, "--plan", str(out / "plan.json"), "-o", str(out)])
    assert result.exit_code == BAD_INPUT
    assert "plan.json: refusing to overwrite an input file" in result.stderr
    assert folder_bytes(out) == before


def test_float_pixels_0_to_255_without_an_attack_are_warned_about(tiny_inputs: tuple[str, str], tmp_path: Path) -> None:
    """--bits --no-eval runs no attack, so --input-range is not used: a warning, not a refusal;
    the artifact's evaluation attacks it, so there the same data is refused."""
    model, _ = tiny_inputs
    data = npz(tmp_path, "raw.npz", x=good_x() * 255, y=good_y())
    result = CliRunner().invoke(main, ["compile", model, "--data", data, "--bits", "8", "--no-eval", "-o", str(tmp_path / "out")])
    assert result.exit_code == 0
    assert "outside --input-range 0,1" in result.stderr and "--scale 1/255" in result.stderr
    evaluated = CliRunner().invoke(main, ["compile", model, "--data", data, "--bits", "8", "-o", str(tmp_path / "out2")])
    assert evaluated.exit_code == 1 and not (tmp_path / "out2").exists()


def test_a_byte_order_mark_before_the_csv_header_keeps_the_label_column(tmp_path: Path) -> None:
    from quanos_onnx.data import InputSpec, load_dataset

    rows = np.random.default_rng(0).integers(0, 256, (4, 3 * 8 * 8))
    labels = np.array([3, 1, 4, 1])
    header = "label," + ",".join(f"pixel{i}" for i in range(rows.shape[1]))
    text = "\n".join([header, *(f"{y}," + ",".join(map(str, row)) for y, row in zip(labels, rows))])
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    dataset = load_dataset(path, InputSpec("x", (None, 3, 8, 8)), num_classes=10)
    assert dataset.y.tolist() == labels.tolist()
    assert np.allclose(dataset.x.reshape(4, -1), rows / 255)


def test_external_data_outside_the_folder_gets_one_message_whether_or_not_it_exists(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    onnx.save(good_model(), folder / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0)
    model = onnx.load(str(folder / "m.onnx"), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../secret.bin"
    onnx.save(model, folder / "m.onnx")
    args = ["layers", str(folder / "m.onnx")]
    absent = CliRunner().invoke(main, args)
    (tmp_path / "secret.bin").write_bytes(bytes(100_000))
    present = CliRunner().invoke(main, args)
    assert absent.exit_code == present.exit_code == BAD_INPUT
    assert absent.stderr == present.stderr
    assert "outside the model's folder" in absent.stderr


# -- signals and stdout: the exit code says what is on disk --------------------------------


def test_ctrl_c_after_the_outputs_are_written_says_they_exist(
    tiny_inputs: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, data = tiny_inputs

    def interrupted(self: object) -> str:
        raise KeyboardInterrupt

    monkeypatch.setattr(compile_room.CompileResult, "summary_text", interrupted)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["compile", model, "--data", data, "--bits", "8", "-o", str(out)])
    assert result.exit_code == WRITTEN
    assert result.stderr.splitlines() == [
        f"error: interrupted after the outputs were written; the outputs in {out} "
        "(model.quanos.onnx, plan.json, report.json, run.json, report.md, report.html) are complete"
    ]
    assert len(list(out.iterdir())) == 6


def run_quanos(args: list[str], **popen: object) -> subprocess.Popen[bytes]:
    environment = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    return subprocess.Popen([sys.executable, "-m", "quanos_onnx.cli", *args], env=environment, stderr=subprocess.PIPE, **popen)  # type: ignore[call-overload]


@pytest.mark.parametrize("delay", [1.0, 3.0])
def test_two_quick_ctrl_c_give_one_line_and_130(tiny_inputs: tuple[str, str], tmp_path: Path, delay: float) -> None:
    """The second Ctrl-C, 50 ms after the first, cannot cut short the cleanup or the line."""
    model, data = tiny_inputs
    out = tmp_path / "out"
    process = run_quanos(["compile", model, "--data", data, "--samples", "8", "--no-eval", "-o", str(out)], stdout=subprocess.PIPE)
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert (process.returncode, stderr.decode().splitlines()) == (130, ["error: interrupted; no output was written"])
    assert not out.exists()


def test_ctrl_c_while_the_interpreter_shuts_down_keeps_the_exit_code(tiny_inputs: tuple[str, str], tmp_path: Path) -> None:
    model, data = tiny_inputs
    out = tmp_path / "out"
    script = (
        "import atexit, os, signal, sys, time\n"
        "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(0.2)))\n"
        "from quanos_onnx.cli import main\n"
        f"sys.argv = ['quanos', 'compile', {model!r}, '--data', {data!r}, '--bits', '8', '-o', {str(out)!r}]\n"
        "main()\n"
    )
    environment = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, timeout=120)
    assert (done.returncode, done.stderr) == (0, b"")
    assert len(list(out.iterdir())) == 6


def test_stdout_on_a_full_disk_says_the_outputs_exist(tiny_inputs: tuple[str, str], tmp_path: Path) -> None:
    model, data = tiny_inputs
    out = tmp_path / "out"
    with open("/dev/full", "wb") as full:
        process = run_quanos(["compile", model, "--data", data, "--bits", "8", "--json", "-o", str(out)], stdout=full)
        _, stderr = process.communicate(timeout=120)
    lines = stderr.decode().splitlines()
    assert process.returncode == WRITTEN
    assert len(lines) == 1 and lines[0].startswith("error: stdout: cannot write the result (No space left on device); the outputs in")
    assert len(list(out.iterdir())) == 6


def test_stdout_on_a_closed_pipe_without_outputs_is_one_line_exit_1(tiny_inputs: tuple[str, str]) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        process = run_quanos(["layers", tiny_inputs[0]], stdout=write_end)
    finally:
        os.close(write_end)
    _, stderr = process.communicate(timeout=120)
    assert (process.returncode, stderr.decode().splitlines()) == (BAD_INPUT, [
        "error: stdout: cannot write the result (Broken pipe) (hint: check the pipe or disk that stdout goes to)"
    ])
