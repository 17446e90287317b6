"""Launcher: a Plan becomes a run dir of artifacts, and the artifacts are submitted.

`artifacts.py` writes the run dir atomically (plan.json, recipe, the DeepSpeed JSON from
`deepspeed_config.py`, the sbatch script from `slurm.py`, the local script from `local_launch.py`);
`slurm_jobs.py` / `slurm_status.py` submit, report and cancel SLURM jobs, `local_launch.py` runs
torchrun stage by stage under supervision, `summary.py` sums up a finished pipeline, and
`assets.py` finds the shipped ZeRO presets and sbatch template. It reads `dist_ft.plan` and
`dist_ft.recipe`, plus two values the ranks own (`rank.stop.stop_grace_s`, the rendezvous port range
in `rank.distributed`), so launcher and ranks agree on them. It hands on processes:
`python -m dist_ft train --run-dir ... --stage ...` on every rank.
"""
