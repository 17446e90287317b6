"""What a batch's labels mean, shared by the data pipeline, the loss and the sequence-parallel slicer."""

from dist_ft.store.format import IGNORE_INDEX  # a label that scores nothing; the store's label masks use it too
SHIFT_LABELS = "shift_labels"  # targets already shifted (a sequence-parallel slice's labels)
