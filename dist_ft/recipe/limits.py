"""Upper bounds on every number a recipe gives: big enough for real runs, small enough that a typo
cannot make the planner loop, allocate or overflow."""

# in the planner stays small, so a planner call on any recipe returns within seconds.
MAX_SEQ_LEN = 1 << 24  # tokens per sequence (16M)
MAX_STAGES = 64  # long-context stages; a real schedule has a handful
MAX_STEPS = 10**9
MAX_TOKENS = 10**15  # tokens of one stage (a pretraining corpus is ~1e13)
MAX_TOKENS_PER_STEP = 1 << 32  # global tokens per optimizer step (large runs use ~1.6e7)
MAX_BATCH = 1 << 24  # sequences per optimizer step
MAX_MICRO_BATCH = 1 << 12  # sequences per rank per micro-step
MAX_EPOCHS = 10_000
MAX_ROPE_FACTOR = 1024.0
MAX_ROPE_THETA = 1e15
MAX_ADAPTER_SIZE = 1 << 16  # LoRA rank, virtual tokens, encoder width, trainable layers
MAX_NODES = 1 << 16
MAX_GPUS_PER_NODE = 64
MAX_PROCS_PER_NODE = 256
MAX_SEED = 2**32 - 1  # seeds are summed with epochs and offsets into generators that take 64 bits
MAX_NAME = 100  # names become file names (ds_config.NAME.json, NAME.sbatch): far below NAME_MAX
