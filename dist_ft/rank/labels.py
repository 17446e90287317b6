"""What a batch's labels mean, shared by the data pipeline, the loss and the sequence-parallel slicer."""

IGNORE_INDEX = -100  # a label that scores nothing (transformers' and torch's cross-entropy default)
SHIFT_LABELS = "shift_labels"  # targets already shifted (a sequence-parallel slice's labels)
