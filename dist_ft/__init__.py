"""dist-ft: DeepSpeed-based distributed trainer that extends LLM context windows, then fine-tunes.

The folders follow the data: `recipe/` (YAML -> typed Recipe) -> `plan/` (Recipe + model shape ->
Plan, the pure contract) -> `launcher/` (Plan -> run-dir artifacts -> SLURM or local torchrun) ->
`rank/` (`python -m dist_ft train` on every rank) -> `evaluation/` (perplexity, passkey, generation
metrics). `cli.py` dispatches the subcommands.
"""
