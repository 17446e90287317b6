"""Rank: what `python -m dist_ft train` runs on every rank, one stage of a run dir.

`trainer.py` reads plan.json back (`Plan.from_json`), `distributed.py` reads RANK / SLURM variables
(the only module that does), and the trainer wires `stage_data.py` (+ `data/`: read, pack, batch),
`stage_model.py` (`model.py`, `methods.py`, `positions.py`, `tokenizer.py`), the long-context levers
(`loss.py` + `head_loss.py`, `sequence_parallel.py`, `attention.py`, `tiled_mlp.py`, `activation_offload.py`,
`labels.py`), `engine.py` (the only DeepSpeed import), `loop.py` (one loop for every method),
`schedule.py`, `stage_checkpoints.py` + `checkpoint.py` (the checkpoint policy and its files), `stop.py`
and `metrics.py`. It reads `dist_ft.plan` and `dist_ft.recipe`; it hands on checkpoints, the
stage's export or adapter, metrics.jsonl and DONE in the run dir, and calls evaluation after a stage
when the plan asks for it.
"""
