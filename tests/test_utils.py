"""utils: array conversion keeps precision, integer arguments are checked, the top level is torch-free."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from skipit_core.errors import InputError
from skipit_core.utils import as_int, as_numpy, as_probability_level, set_seed


def test_as_numpy_keeps_float64_tensors_and_upcasts_half_precision():
    x = torch.tensor([1.0, 1.0 + 1e-12, 2.0], dtype=torch.float64)
    out = as_numpy(x)
    assert out.dtype == np.float64 and out[1] - 1.0 == pytest.approx(1e-12, rel=1e-3)  # float32 gives 0
    assert as_numpy(x, dtype=None).dtype == np.float64
    for half in (torch.float16, torch.bfloat16):
        h = torch.tensor([0.5, 1.5, 3.0], dtype=half)
        assert np.array_equal(as_numpy(h), [0.5, 1.5, 3.0])
        kept = as_numpy(h, dtype=None)  # NumPy has no bfloat16: upcast (exactly) to float32
        assert kept.dtype == np.float32 and np.array_equal(kept, [0.5, 1.5, 3.0])
    assert as_numpy(torch.tensor([3, 4]), dtype=None).dtype == np.int64


def test_as_numpy_rejects_complex_and_text():
    with pytest.raises(InputError, match="complex.*x.real"):
        as_numpy(np.array([1 + 2j, 3.0]))
    with pytest.raises(InputError, match="numeric"):
        as_numpy(np.array(["a", "b"]), dtype=None)


@pytest.mark.parametrize("value", [3, np.int64(3), np.uint8(3), torch.tensor(3), np.array(3)])
def test_as_int_accepts_integer_likes(value):
    got = as_int(value, "k", minimum=1)
    assert got == 3 and type(got) is int


@pytest.mark.parametrize("value, message", [
    (True, "got the bool True"), (np.bool_(True), "bool"), (torch.tensor(True), "bool"),
    (3.0, "got 3.0 of type float"), ("3", "got '3' of type str"), (torch.tensor(3.0), "type Tensor"),
    (0, "must be a positive integer; got 0"),
])
def test_as_int_rejects_the_rest_with_a_clear_message(value, message):
    with pytest.raises(InputError, match=message):
        as_int(value, "k", minimum=1)


@pytest.mark.parametrize("value", [0, 1, 1.5, 95, float("nan"), True, "0.95", None])
def test_probability_level_must_lie_strictly_inside_0_1(value):
    with pytest.raises(InputError, match=r"in \(0, 1\)"):
        as_probability_level(value)
    assert as_probability_level(np.float32(0.5)) == 0.5


def test_set_seed_repeats_draws_and_leaves_pythonhashseed_alone(monkeypatch):
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    set_seed(7)
    a = (np.random.rand(), torch.rand(1).item())
    set_seed(7)
    assert (np.random.rand(), torch.rand(1).item()) == a
    assert "PYTHONHASHSEED" not in os.environ  # it has no effect in a running interpreter
    with pytest.raises(InputError, match="seed"):
        set_seed(-1)


def test_import_skipit_core_does_not_load_torch():
    code = ("import sys, skipit_core; assert 'torch' not in sys.modules, 'torch loaded'; "
            "skipit_core.set_seed; skipit_core.InputError; skipit_core.stats.wilson_interval(1, 2); "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def test_seeds_outside_torchs_range_are_rejected():
    with pytest.raises(InputError, match="seed must be at most"):
        set_seed(2**64 + 5)  # torch raised a raw ValueError (overflow)
