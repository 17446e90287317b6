"""Plan: the pure contract between the launcher and the ranks.

`preflight.py` checks the recipe's paths and reads the model's shape (the only I/O), `plan.py`
turns Recipe + shape into a `Plan` (the recipe's own sections plus every derived number) with
`checks.py`'s cross-field checks and `micro_batch.py`'s micro-batch search,
`batching.py` is the one source of dp, accumulation, train batch and tokens per step, `rope.py`
holds all RoPE reasoning, `memory.py` the memory estimate, `plan_report.py` what `dist-ft plan`
prints, and `run_dir.py` every path of a run dir. It reads only `dist_ft.recipe` and imports no
torch, launcher, rank or evaluation module. It hands a `Plan` to the launcher, which writes it to
plan.json; the ranks and evaluation read it back with `Plan.from_json` and use the same
`batching`, `rope` and `run_dir` functions, which is why those live here and not on one side.
"""
