"""The short-context regression check after a long-context stage (issue 27 item 5): perplexity on held-out
text inside the starting model's native window, the stage's export against the starting model's, with a
warning when the stage made it worse by more than REGRESSION_THRESHOLD.

Context extension that ruins the model's short-context quality is a common failure (too high a learning
rate, too few steps, a RoPE that distorts the low frequencies); the long bands alone would not show it.
Both numbers come from the after-stage evaluations (RUN/eval/base and RUN/eval/<stage>, the same windows of
the same text), so the check costs no forward of its own. Result: RUN/eval/<stage>/short_context.json.
"""

from __future__ import annotations

import json
from typing import Any

from .stage_comparison import BASE, OWN_ROPE

REGRESSION_THRESHOLD = 0.05  # 5 % higher perplexity inside the native window than the starting model's


def short_length(lengths: list[int], native: int | None) -> int | None:
    """The longest evaluated length inside the native window (None if none is)."""
    inside = [n for n in lengths if native and n <= native]
    return max(inside) if inside else None


def check_short_context(plan, stage_name: str, echo) -> dict[str, Any] | None:
    """Compare the stage's and the starting model's perplexity at the short length; None when there is
    nothing to compare (not a long-context stage, no length inside the window, no starting model)."""
    stage = plan.stage(stage_name)
    native = plan.model_shape.max_position_embeddings if plan.model_shape else None
    if stage.phase != "continued_pretraining":
        return None
    own, base = (_ppl_by_length(plan.run.eval(name) / "results.json") for name in (stage_name, BASE))
    length = short_length([int(n) for n in own], native)
    if length is None:
        echo(f"[eval] short-context check skipped: no evaluated length inside the native {native} tokens")
        return None
    if str(length) not in base:
        echo("[eval] short-context check skipped: the starting model was not evaluated")
        return None
    change = own[str(length)] / base[str(length)] - 1
    record = {"stage": stage_name, "length": length, "native": native, "ppl": own[str(length)],
              "base_ppl": base[str(length)], "change": change, "threshold": REGRESSION_THRESHOLD,
              "regressed": change > REGRESSION_THRESHOLD}
    (plan.run.eval(stage_name) / "short_context.json").write_text(json.dumps(record, indent=1) + "\n")
    verdict = "warning: short-context regression" if record["regressed"] else "short-context check"
    echo(f"[eval] {verdict}: ppl @ {length} (inside the native {native}) {base[str(length)]:.3f} -> "
         f"{own[str(length)]:.3f} ({change:+.1%}; threshold +{REGRESSION_THRESHOLD:.0%})")
    return record


def _ppl_by_length(path) -> dict[str, float]:
    if not path.is_file():
        return {}
    variants = json.loads(path.read_text())["variants"]
    variant = variants.get(OWN_ROPE) or next(iter(variants.values()))
    return {length: row["ppl"] for length, row in variant["perplexity"].items()}
