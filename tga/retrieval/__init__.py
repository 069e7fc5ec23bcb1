"""tga/retrieval

Text retrieval for training images: CLIP-style embedders (open_clip or HF CLIP), a faiss index over a
caption corpus, and the resumable `tga retrieve` job that fills each record's `retrieved_caption` (R)
and `retrieved_topk`, never returning the record's own caption.
"""

from tga.retrieval.backends import build_embedder
from tga.retrieval.corpus import load_corpus
from tga.retrieval.embedders import ClipEmbedder
from tga.retrieval.index import CaptionIndex, build_index, load_or_build_caption_index
from tga.retrieval.retrieve import RetrieveConfig, normalize_text, pick_retrieved, retrieve_file, retrieve_for_records

__all__ = [
    "CaptionIndex",
    "ClipEmbedder",
    "RetrieveConfig",
    "build_embedder",
    "build_index",
    "load_corpus",
    "load_or_build_caption_index",
    "normalize_text",
    "pick_retrieved",
    "retrieve_file",
    "retrieve_for_records",
]
