"""The parity gate: a twin is only trusted after it reproduces onnxruntime on a real batch.

Float models must match within `rtol`, measured per output as max |twin - ort| divided by
max |ort| (relative to the output's scale, so near-zero logits do not inflate it). Fake-
quant models can legitimately differ by a quantization step where a value sits on a
rounding boundary (ORT fuses DQ-Conv-Q into integer kernels that requantize differently),
so they must agree on every sample's argmax and report the max abs difference.

On failure the error names the first diverging node. Every intermediate tensor is added
as an output of an onnxruntime copy; each twin step is then re-run on onnxruntime's own
inputs, so the first node whose output differs is the faulty op itself rather than the
first place accumulated error becomes visible. If no node differs on its own, the first
node whose end-to-end value leaves tolerance is named instead.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import torch

from ..errors import DataError, ParityError
from ..model import make_session, with_outputs
from .graph import QUANTIZER_OPS, Step
from .module import OnnxTwin

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParityReport:
    max_abs_diff: float
    max_rel_diff: float
    argmax_agreement: float
    """Fraction of samples whose first output's argmax (over its last axis) agrees."""
    is_fake_quant: bool


@dataclass(frozen=True)
class Divergence:
    node_name: str
    op_type: str
    rel_diff: float
    local: bool
    """True when the node differs given onnxruntime's own inputs (the op itself is wrong)."""


def check_parity(
    twin: OnnxTwin,
    model: onnx.ModelProto,
    batch: Mapping[str, np.ndarray] | np.ndarray,
    *,
    rtol: float = 1e-4,
    flip_allowance: float = 0.01,
) -> ParityReport:
    """Compare the twin with onnxruntime on `batch`; raise ParityError naming the first diverging node.

    A fake-quant model whose argmaxes disagree fails when some op differs on onnxruntime's
    own inputs, or when more than `flip_allowance` of the samples disagree; fewer flips with
    every op exact are rounding ties in float kernels (see the module docstring) and are
    logged as a warning. Pass flip_allowance=0 to fail on any disagreement.
    """
    feeds = _feeds(twin, batch)
    expected = run_onnxruntime(model, feeds)
    with torch.no_grad():
        outputs, _ = twin.run({name: _tensor(value) for name, value in feeds.items()})
    got = [output.detach().cpu().numpy() for output in outputs]
    report = ParityReport(
        max_abs_diff=max(float(np.max(np.abs(g - e), initial=0.0)) for g, e in zip(got, expected)),
        max_rel_diff=max(relative_difference(g, e) for g, e in zip(got, expected)),
        argmax_agreement=_argmax_agreement(got[0], expected[0]),
        is_fake_quant=any(node.op_type in QUANTIZER_OPS for node in model.graph.node),
    )
    log.info("twin parity: %s", report)
    failed = report.argmax_agreement < 1.0 if report.is_fake_quant else report.max_rel_diff > rtol
    if not failed:
        return report
    worst = _worst_sample(got[0], expected[0])
    divergence = first_divergence(twin, model, {name: value[worst : worst + 1] for name, value in feeds.items()}, rtol)
    explained = divergence is None or not divergence.local
    if report.is_fake_quant and explained and 1.0 - report.argmax_agreement <= flip_allowance:
        log.warning(
            "%.2f%% of argmaxes differ from onnxruntime, but no op differs on onnxruntime's own inputs: "
            "rounding ties in float kernels (max abs difference %.3g)",
            100 * (1.0 - report.argmax_agreement),
            report.max_abs_diff,
        )
        return report
    raise ParityError(_failure_message(report, rtol, divergence))


def relative_difference(got: np.ndarray, expected: np.ndarray) -> float:
    """max |got - expected| / max |expected|, in float64 (0 for empty or all-zero tensors)."""
    got64, expected64 = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    if got64.shape != expected64.shape:
        return float("inf")
    if got64.size == 0:
        return 0.0
    difference = float(np.max(np.abs(got64 - expected64)))
    scale = float(np.max(np.abs(expected64)))
    return difference / scale if scale > 0 else difference


def run_onnxruntime(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Outputs of onnxruntime; a model whose input is fixed at batch 1 is run sample by sample."""
    session = make_session(model)
    static_batch = [i.shape[0] for i in session.get_inputs() if i.shape and isinstance(i.shape[0], int)]
    batch = next(iter(feeds.values())).shape[0]
    if not static_batch or static_batch[0] == batch:
        return session.run(None, dict(feeds))
    runs = [
        session.run(None, {name: value[index : index + 1] for name, value in feeds.items()})
        for index in range(batch)
    ]
    return [np.concatenate([run[position] for run in runs]) for position in range(len(runs[0]))]


def first_divergence(
    twin: OnnxTwin, model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], rtol: float
) -> Divergence | None:
    """The first node (in execution order) whose twin output differs from onnxruntime's."""
    steps = [*twin.program.folded, *twin.program.steps]
    produced = {name for node in model.graph.node for name in node.output}
    graph_outputs = [value.name for value in model.graph.output]
    names = [name for step in steps for name in step.outputs if name in produced]
    extra = [name for name in names if name not in graph_outputs]
    reference = dict(zip(graph_outputs + extra, run_onnxruntime(with_outputs(model, extra), feeds)))
    known = {name: _tensor(value) for name, value in {**reference, **feeds}.items()}
    static = {**twin.constants_by_name(), **twin.parameters_by_name()}
    with torch.no_grad():
        for step in steps:
            local = _local_difference(step, known, static, reference)
            if local is not None and local > rtol:
                return Divergence(step.node_name, step.op_type, local, True)
        _, captured = twin.run({name: _tensor(value) for name, value in feeds.items()}, capture=names)
    for step in steps:
        for name in step.outputs:
            if name in captured and name in reference:
                difference = relative_difference(captured[name].cpu().numpy(), reference[name])
                if difference > rtol:
                    return Divergence(step.node_name, step.op_type, difference, False)
    return None


def _tensor(array: np.ndarray) -> torch.Tensor:
    """A torch copy (onnxruntime and callers may hand out read-only arrays)."""
    return torch.from_numpy(np.array(array))


def _local_difference(
    step: Step,
    known: Mapping[str, torch.Tensor],
    static: Mapping[str, torch.Tensor],
    reference: Mapping[str, np.ndarray],
) -> float | None:
    """Relative difference of one step run on onnxruntime's inputs, None if it cannot be judged.

    Steps that emulate a fused integer kernel cannot be judged: exposing their output stops
    onnxruntime from fusing them, so its reference value is the unfused one."""
    if step.emulated or not all(not name or name in known or name in static for name in step.inputs):
        return None
    arguments = [None if not name else known[name] if name in known else static[name] for name in step.inputs]
    try:
        results = step.run(arguments)
    except (RuntimeError, ValueError, IndexError, TypeError):
        return float("inf")
    differences = [
        relative_difference(result.detach().cpu().numpy(), reference[name])
        for name, result in zip(step.outputs, results)
        if name in reference
    ]
    return max(differences) if differences else None


def _feeds(twin: OnnxTwin, batch: Mapping[str, np.ndarray] | np.ndarray) -> dict[str, np.ndarray]:
    if isinstance(batch, np.ndarray):
        if len(twin.input_names) != 1:
            raise DataError(f"the model takes inputs {list(twin.input_names)}; pass a dict of arrays")
        batch = {twin.input_names[0]: batch}
    missing = [name for name in twin.input_names if name not in batch]
    if missing:
        raise DataError(f"parity batch lacks model input '{missing[0]}'")
    return {name: np.ascontiguousarray(batch[name]) for name in twin.input_names}


def _argmax_agreement(got: np.ndarray, expected: np.ndarray) -> float:
    if got.ndim == 0 or got.shape != expected.shape:
        return float(np.array_equal(got, expected))
    return float(np.mean(np.argmax(got, axis=-1) == np.argmax(expected, axis=-1)))


def _worst_sample(got: np.ndarray, expected: np.ndarray) -> int:
    if got.ndim == 0 or got.shape != expected.shape:
        return 0
    disagreeing = np.argmax(got, axis=-1) != np.argmax(expected, axis=-1)
    if got.ndim > 1 and disagreeing.any():
        return int(np.flatnonzero(disagreeing.reshape(got.shape[0], -1).any(axis=1))[0])
    per_sample = np.abs(got.astype(np.float64) - expected).reshape(got.shape[0], -1).max(axis=1)
    return int(np.argmax(per_sample))


def _failure_message(report: ParityReport, rtol: float, divergence: Divergence | None) -> str:
    if report.is_fake_quant:
        summary = (
            f"fake-quant twin disagrees with onnxruntime on {1 - report.argmax_agreement:.1%} of argmaxes "
            f"(max abs difference {report.max_abs_diff:.3g})"
        )
    else:
        summary = f"twin differs from onnxruntime by {report.max_rel_diff:.3g} relative (tolerance {rtol:g})"
    if divergence is None:
        return f"{summary}; no single node diverges beyond tolerance"
    how = "on onnxruntime's own inputs" if divergence.local else "end to end (no node differs on its own inputs)"
    return (
        f"{summary}; first diverging node '{divergence.node_name}' ({divergence.op_type}), "
        f"{divergence.rel_diff:.3g} relative {how}"
    )
