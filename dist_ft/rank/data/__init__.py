"""Data for a stage: rows packed from token stores (dist_ft/store), served as resumable micro-batches. The
in-memory pipeline (pipeline.py) is kept as the reference the store path is tested against."""

from .batches import BatchStream, collate
from .pack import IGNORE_INDEX, LONG_DOC_POLICIES, pack_documents, pack_examples
from .pipeline import SourceRows, mixture_rows, pretraining_rows, sft_rows, split_rows, tokenize_documents
from dist_ft.store.read import BadRows, DataError, read_documents, read_records
from dist_ft.store.sft import FORMATS, answer_examples, prompt_ids, sft_example

__all__ = ["FORMATS", "IGNORE_INDEX", "LONG_DOC_POLICIES", "BadRows", "BatchStream", "DataError", "SourceRows",
           "collate", "mixture_rows", "pack_documents", "pack_examples", "pretraining_rows", "read_documents",
           "read_records", "sft_example",
           "sft_rows", "split_rows", "tokenize_documents", "answer_examples", "prompt_ids"]
