"""twin/tensors.py: the memory format attacked batches take."""

from __future__ import annotations

import torch

from quanos_onnx.twin.tensors import channels_last


def test_channels_last_keeps_values_and_shape_and_changes_only_the_layout():
    images = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    moved = channels_last(images)
    assert moved.shape == images.shape and torch.equal(moved, images)
    assert moved.is_contiguous(memory_format=torch.channels_last)
    assert not images.is_contiguous(memory_format=torch.channels_last)


def test_batches_that_are_not_images_are_left_as_they_are():
    rows = torch.ones(4, 7)
    assert channels_last(rows) is rows
