"""Data: the training text (corpus.py) and the batches cut from it (windows.py); corpora larger
than memory as token shards (prepare.py writes them from sources.py's documents, shards.py reads them)."""
from .corpus import load_corpus, read_text
from .shards import TokenDir, TrainBatches, ValBatches
from .windows import DataLoader, make_loaders, sliding_windows

__all__ = ["DataLoader", "TokenDir", "TrainBatches", "ValBatches", "load_corpus", "make_loaders", "read_text",
           "sliding_windows"]
