"""Evaluation: metrics of a trained model (`dist-ft eval`, `dist-ft generate`).

`evaluate.py` measures perplexity by context length (`eval_nll.py`) and passkey retrieval
(`eval_passkey.py`) and writes tables, plots and W&B logs (`eval_report.py`); `generate.py` answers
prompts and scores them with `task_metrics.py` (exact match, ROUGE-L, BLEU, chrF, accuracy). Both load
the model through `eval_model.py` from a run dir, an export, an adapter or a plain model, applying
RoPE variants through `plan.rope`. It reads a run dir's plan.json (`Plan.from_json`, `run_dir`) and
builds on the rank side's model and loss code (`rank.model`, `rank.loss`, `rank.metrics`); the
trainer calls `evaluate_after_stage` when a recipe asks for evaluation after each stage. It hands on
results in the run dir's eval folder (or `--out`).
"""
