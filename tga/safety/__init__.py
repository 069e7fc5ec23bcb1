"""tga/safety

The paper's safety analysis and evaluation tools: the activation layer of the LLM's safety mechanism
(logit lens, Algorithm 1), per-layer image-versus-caption hidden-state similarity, refusal judges, and the
defence-success-rate (DSR) and benign-VQA evaluations. The library functions take plain tensors, models and
callables so that each piece is testable alone; `tga analyze`, `tga evaluate` and `tga chat` wire them to a
checkpoint.
"""
