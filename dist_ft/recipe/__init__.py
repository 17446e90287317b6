"""Recipe: a YAML file (and `--set` overrides) in, a frozen, typed `config.Recipe` out.

`recipe_yaml.py` reads the YAML with size and depth limits, `raw_recipe.py` applies `--set` overrides,
`strict.py` builds the dataclasses of `config.py` (with the sections of `optimization.py`,
`finetune_options.py` and `run_sections.py`, all re-exported there) and reports every bad key at once; `prompts.py`, `data_files.py`, `launch_script.py`
(which `cluster.env` names a recipe may set) and `model_shape.py` (what a model's config.json says)
hold the checks and tables those sections are validated against, `timelimit.py` parses
`cluster.time_limit`, and `reference.py` prints docs/recipe-reference.md. It reads only the recipe
and imports nothing else from dist_ft, so every other side may import it: the plan builds on these
sections, plan.json is read back on each rank through the same strict loader, and the launcher,
ranks and evaluation use its types.
"""
