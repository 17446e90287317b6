"""dist-ft: DeepSpeed-based distributed trainer that extends LLM context windows, then fine-tunes."""
