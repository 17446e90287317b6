"""The token store: every data source tokenized once (by `dist-ft prepare`) into memory-mappable arrays that
every rank, stage, restart and run reads. Below both the launcher and the ranks: imports only recipe/,
durable.py and third-party libraries."""

from .build import build_store, open_source
from .format import DOCUMENTS, EXAMPLES, IGNORE_INDEX, StoreError, TokenStore, open_store
from .key import SourceSpec, store_path, tokenizer_fingerprint
from .read import BadRows, DataError, data_files, iter_documents, read_documents, read_records

__all__ = ["DOCUMENTS", "EXAMPLES", "IGNORE_INDEX", "BadRows", "DataError", "SourceSpec", "StoreError", "TokenStore",
           "build_store", "data_files", "iter_documents", "open_source", "open_store", "read_documents",
           "read_records", "store_path", "tokenizer_fingerprint"]
