"""threads.py: one setting for torch and onnxruntime, restored afterwards; sessions never spin."""

from __future__ import annotations

from tiny_models import vgg_chain

from quanos_onnx.model import make_session
from quanos_onnx.threads import session_threads, using_threads


def test_using_threads_sets_torch_and_session_threads_and_restores_them() -> None:
    import torch

    before = torch.get_num_threads()
    target = 1 if before != 1 else 2
    with using_threads(target):
        assert torch.get_num_threads() == target and session_threads() == target
        options = make_session(vgg_chain()).get_session_options()
        assert options.intra_op_num_threads == target
    assert torch.get_num_threads() == before and session_threads() is None


def test_none_keeps_the_library_defaults() -> None:
    with using_threads(None):
        assert session_threads() is None
        assert make_session(vgg_chain()).get_session_options().intra_op_num_threads == 0


def test_sessions_do_not_spin_between_runs() -> None:
    options = make_session(vgg_chain()).get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_the_default_is_every_core_the_process_may_use(monkeypatch) -> None:
    import inspect
    import os

    import quanos_onnx as qn
    from quanos_onnx import threads
    from quanos_onnx.commands.compile import CompileOptions

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2, 5}, raising=False)
    assert threads.usable_cores() == 3
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert threads.usable_cores() == 6
    assert threads.DEFAULT_THREADS >= 1
    for command in (qn.compile, qn.analyze, qn.evaluate, qn.finetune):
        assert inspect.signature(command).parameters["threads"].default == threads.DEFAULT_THREADS
    assert CompileOptions().threads == threads.DEFAULT_THREADS
