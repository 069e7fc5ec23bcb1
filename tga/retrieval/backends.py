"""tga/retrieval/backends.py

The embedder a `--backend` names: open_clip (`tga.retrieval.open_clip_embedder`) or transformers' CLIP
(`tga.retrieval.hf_clip_embedder`), each imported only when chosen. Both build on `tga.retrieval.embedders`.
"""

from __future__ import annotations

from tga.errors import ConfigError
from tga.retrieval.embedders import DTYPES, ClipEmbedder


def build_embedder(
    backend: str,
    model: str,
    *,
    pretrained: str | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    model_config: str | None = None,
) -> ClipEmbedder:
    """Build an embedder.

    Args:
        backend: "open_clip" or "hf_clip".
        model: open_clip model name (or `local-dir:PATH`), or the folder of an HF `CLIPModel`.
        pretrained: open_clip pretrained tag (e.g. "openai") or checkpoint file; unused by hf_clip.
        device: torch device string.
        dtype: "float32", "float16" or "bfloat16" (weights and inputs).
        model_config: open_clip only: a JSON model config file to register before building `model`.

    Returns:
        A `ClipEmbedder`.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if backend == "open_clip":
        from tga.retrieval.open_clip_embedder import OpenClipEmbedder

        return OpenClipEmbedder.load(model, pretrained, device=device, dtype=dtype, model_config=model_config)
    if backend == "hf_clip":
        from tga.retrieval.hf_clip_embedder import HFClipEmbedder

        if model_config is not None:
            raise ConfigError("--model_config applies to --backend open_clip only")
        return HFClipEmbedder.load(model, device=device, dtype=dtype)
    raise ConfigError(f"--backend must be one of open_clip, hf_clip, got {backend!r}")
