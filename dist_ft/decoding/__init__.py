"""The decoding and scoring core both sides use: `generate.py` (answers to prompts) and `task_metrics.py`
(exact match, ROUGE-L, BLEU, chrF, accuracy). The ranks score answers during a stage with it; `dist-ft
generate` and `dist-ft eval` (evaluation/) build on it. It imports nothing else from dist_ft, so neither
side has to import the other.
"""
