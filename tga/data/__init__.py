"""tga/data

LLaVA-format data: conversation templates, exact tokenization with label masks and spans, record loading and
validation, the lazy multimodal dataset, the batch collator and the modality-length grouped sampler.
"""
