"""Data for a stage: read local files, tokenize, pack into rows, serve resumable micro-batches."""

from .batches import BatchStream, collate
from .pack import IGNORE_INDEX, LONG_DOC_POLICIES, pack_documents, pack_examples
from .pipeline import SourceRows, mixture_rows, pretraining_rows, sft_rows, split_rows, tokenize_documents
from .read import BadRows, DataError, read_documents, read_records
from .sft import FORMATS, answer_examples, prompt_ids, sft_example

__all__ = ["FORMATS", "IGNORE_INDEX", "LONG_DOC_POLICIES", "BadRows", "BatchStream", "DataError", "SourceRows",
           "collate", "mixture_rows", "pack_documents", "pack_examples", "pretraining_rows", "read_documents", "read_records", "sft_example",
           "sft_rows", "split_rows", "tokenize_documents", "answer_examples", "prompt_ids"]
