"""Launcher: a Plan becomes a run dir of artifacts, and the artifacts are submitted.

`artifacts.py` writes the run dir atomically (plan.json, recipe, the DeepSpeed JSON from
`deepspeed_config.py`, the sbatch script from `slurm.py`, the local script from `local_launch.py`);
`slurm_jobs.py` / `slurm_status.py` submit, report and cancel SLURM jobs, `local_launch.py` runs
torchrun stage by stage under supervision, `summary.py` sums up a finished pipeline, and
`assets.py` finds the shipped ZeRO presets and sbatch template; `ssh_launch.py`, `ssh_node.py` and
`ssh_control.py` run, report and cancel the ssh backend, `heartbeat_status.py` reads the ranks' heartbeats
and `prepare.py` builds the token stores. It reads `dist_ft.plan` (the run records of `plan.run_records`
included), `dist_ft.recipe` and `dist_ft.store`, plus what the ranks own so that both sides agree:
`rank.stop.stop_grace_s`, the rendezvous port range in `rank.distributed`, `rank.heartbeat.HOST_ENV`, and
`rank.model.load_tokenizer` (prepare tokenizes as the ranks would). It hands on processes:
`python -m dist_ft train --run-dir ... --stage ...` on every rank.
"""
