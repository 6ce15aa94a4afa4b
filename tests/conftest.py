"""Shared by every test: bfloat16 and int8 as on a CPU with bfloat16 units and VNNI, on any CPU.

Where a CPU has no bfloat16 units (no AVX512-BF16, no AMX), a bfloat16 model and bf16-autocast
training run in float32 (`segcompare.models.precision.cpu_has_bf16_units`). The tests of the
bfloat16 paths must test those paths on every CPU, so here that check says yes; the tests of
the float32 fallback set it to no themselves. Likewise int8 is offered here as on a CPU with
VNNI (`cpu_has_vnni`); the test of its refusal elsewhere says no. Tests that start a process of
their own see the real CPU.
"""

import pytest


@pytest.fixture(autouse=True)
def _bf16_units(monkeypatch):
    from segcompare.models import precision

    monkeypatch.setattr(precision, "cpu_has_bf16_units", lambda: True)
    monkeypatch.setattr(precision, "cpu_has_vnni", lambda: True)
