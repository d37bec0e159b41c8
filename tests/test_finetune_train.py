"""Fine-tuning through the fake-quant twin: recovery, adversarial training, round trip."""

from __future__ import annotations

import numpy as np
import pytest

from finetune_task import trained_task
from quanos_onnx.data import Dataset
from quanos_onnx.errors import DataError, UsageError
from quanos_onnx.finetune import FinetuneSettings, compiled_plan, finetune
from quanos_onnx.harness.attacks import Attack
from quanos_onnx.harness.evaluate import evaluate
from quanos_onnx.layers import list_layers
from quanos_onnx.model import Runner
from quanos_onnx.plan import Plan


def _accuracy(model, data: Dataset) -> float:
    return float((Runner(model).run(np.array(data.x))[0].argmax(1) == data.y).mean())


@pytest.fixture(scope="module")
def recovery():
    model, train, val = trained_task()
    plan = Plan.uniform(list_layers(model), 2, keep_output_float=False)
    settings = FinetuneSettings(epochs=4, learning_rate=3e-3, seed=0)
    return model, train, val, finetune(model, plan, train, settings, val=val)


def test_finetuning_recovers_what_2_bit_post_hoc_quantization_lost(recovery):
    model, _, val, result = recovery
    float_accuracy = _accuracy(model, val)
    post_hoc = result.history[0].val_accuracy
    assert post_hoc < float_accuracy - 0.1
    assert _accuracy(result.model, val) >= float_accuracy - 0.02


def test_the_written_model_is_the_best_epoch_on_validation(recovery):
    _, _, val, result = recovery
    scores = [record.val_accuracy for record in result.history]
    assert result.best_epoch == int(np.argmax(scores))
    assert result.selected_by == "val_accuracy"
    assert _accuracy(result.model, val) == pytest.approx(scores[result.best_epoch])
    assert [record.epoch for record in result.history] == [0, 1, 2, 3, 4]
    assert all(record.train_loss > 0 for record in result.history[1:])


def test_round_trip_twin_and_onnxruntime_agree(recovery):
    _, _, val, result = recovery
    assert result.round_trip.samples == val.count
    assert result.round_trip.prediction_agreement >= 0.99
    assert result.round_trip.max_abs_diff < 1e-3


def test_the_plan_is_kept_and_records_the_finetuning(recovery):
    model, _, _, result = recovery
    stored = compiled_plan(result.model)
    assert stored.by_name() == result.plan.by_name()
    assert {entry.weight_bits for entry in stored.layers} == {2}
    assert stored.details["finetune"]["best_epoch"] == result.best_epoch
    assert stored.details["finetune"]["epochs"] == 4


@pytest.mark.slow
def test_adversarial_finetuning_raises_pgd_accuracy_over_plain_finetuning():
    model, train, val = trained_task()
    plan = Plan.uniform(list_layers(model), 4)
    eps = 0.06
    plain = finetune(model, plan, train, FinetuneSettings(epochs=3, learning_rate=3e-3))
    attack = Attack.pgd(eps, steps=5, random_start=True)
    hardened = finetune(
        model, plan, train, FinetuneSettings(epochs=3, learning_rate=3e-3, adversarial=attack, adversarial_weight=1.0)
    )
    assert hardened.history[-1].train_adversarial_accuracy is not None
    test_attack = [Attack.pgd(eps, steps=5)]
    plain_pgd = evaluate(plain.model, [(np.array(val.x), val.y)], test_attack).attacks[0].accuracy
    hardened_pgd = evaluate(hardened.model, [(np.array(val.x), val.y)], test_attack).attacks[0].accuracy
    assert hardened_pgd > plain_pgd + 0.04


def test_same_seed_same_model_bytes():
    model, train, _ = trained_task()
    small = Dataset(train.x[:256], train.y[:256], "small")
    plan = Plan.uniform(list_layers(model), 3)
    runs = [finetune(model, plan, small, FinetuneSettings(epochs=1, seed=seed)).model for seed in (5, 5, 6)]
    assert runs[0].SerializeToString() == runs[1].SerializeToString()
    assert runs[0].SerializeToString() != runs[2].SerializeToString()


def test_refusals_name_the_problem():
    model, train, _ = trained_task()
    plan = Plan.uniform(list_layers(model), 3)
    with pytest.raises(DataError, match="labels"):
        finetune(model, plan, Dataset(train.x[:8], None, "unlabeled"), FinetuneSettings(epochs=1))
    with pytest.raises(UsageError, match="epochs"):
        FinetuneSettings(epochs=0)
    with pytest.raises(UsageError, match="adv_weight"):
        FinetuneSettings(epochs=1, adversarial_weight=0.0)
    with pytest.raises(UsageError, match="optimizer"):
        FinetuneSettings(epochs=1, optimizer="rmsprop")
