"""The plan names the loss path each stage takes, as dist_ft.rank.loss takes it."""

from __future__ import annotations

import pytest

from dist_ft.plan.loss_path import loss_path
from dist_ft.plan.plan_report import format_plan
from tests.unit.test_plan import plan_of


@pytest.mark.parametrize(("args", "says"), [
    (("lora", 2, "auto", False, 2048, 4096), "one chunk, no recompute"),
    (("full", 2, "chunked", False, 16384, 4096), "4 fused chunks of 4096 tokens"),
    (("full", 1, "auto", False, 4097, 4096), "2 fused chunks"),
    (("lora", 3, "auto", False, 16384, 4096), "4 fused chunks of 4096 tokens, no recompute: ZeRO-3 gathers"),
    (("full", 3, "auto", True, 16384, 4096), "ZeRO-3 gathers the LM head (and a LoRA adapter on it) once"),
    (("full", 2, "auto", True, 16384, 4096), "Liger's fused linear cross-entropy where liger-kernel is installed, "
                                             "else 4 fused chunks of 4096 tokens: each chunk's gradients"),
    (("prompt", 2, "auto", False, 16384, 4096), "transformers' own loss"),
])
def test_each_path_and_its_reason(args, says):
    assert says in loss_path(*args)


def test_the_plan_prints_the_loss_path_per_stage():
    plan = plan_of(["model.loss_chunk_tokens=256"])
    lines = [line for line in format_plan(plan, "python3").splitlines() if line.startswith("    loss: ")]
    assert len(lines) == len(plan.stages) and all("fused chunks of 256 tokens" in line for line in lines)
