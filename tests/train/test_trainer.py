"""Both trainees satisfy the ``Trainer`` interface ``fit`` drives: every method, with the Protocol's signature."""

from __future__ import annotations

import inspect

import pytest

from edgekd.train.sharded import ShardedTrainee
from edgekd.train.trainer import LocalTrainee, Trainer

METHODS = [name for name, value in vars(Trainer).items() if inspect.isfunction(value) and not name.startswith("_")]


def test_the_protocol_names_what_fit_calls():
    assert set(METHODS) >= {"step_fn", "reduce", "agree", "clip", "save", "load", "finish", "close"}


@pytest.mark.parametrize("cls", [LocalTrainee, ShardedTrainee])
@pytest.mark.parametrize("name", METHODS)
def test_trainee_has_the_protocol_signature(cls, name):
    want = inspect.signature(getattr(Trainer, name))
    got = inspect.signature(getattr(cls, name))
    assert list(got.parameters) == list(want.parameters), (cls.__name__, name, got, want)
    assert got.return_annotation == want.return_annotation, (cls.__name__, name, got, want)
