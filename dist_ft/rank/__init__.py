"""Rank: what `python -m dist_ft train` runs on every rank, one stage of a run dir.

`trainer.py` reads plan.json back (`Plan.from_json`), `distributed.py` reads RANK / SLURM variables
(the only module that does), and the trainer wires `stage_data.py` (+ `data/`: read, pack, batch),
`stage_model.py` (`model.py`, `methods.py`, `positions.py`, `tokenizer.py`), the long-context levers
(`loss.py` + `head_loss.py`, `sequence_parallel.py`, `attention.py`, `tiled_mlp.py`,
`activation_offload.py`, `labels.py`), `engine.py` (process group, engine, ZeRO-3 gathering,
checkpoints: every DeepSpeed import but the public `register_external_parameter` that
`loss.PartitionedHeadLoss` makes on first use under ZeRO-3; the `ds_*` parameter marks read across
rank/ have a canary in tests/unit/test_engine_calls.py), `loop.py` (one loop for every method),
`schedule.py`, `stage_checkpoints.py` + `checkpoint.py` (the checkpoint policy and its files), `stop.py`,
`heartbeat.py` and `metrics.py`. Its batch numbers arrive as one `plan.batching.RankBatch`. It reads
`dist_ft.plan`, `dist_ft.recipe` and the token stores (`dist_ft.store`); it hands on checkpoints, the
stage's export or adapter, metrics.jsonl, heartbeats and DONE (`plan.run_records`) in the run dir, and
calls evaluation after a stage when the plan asks for it.
"""
