"""tga/align

The core of TGA: pooling of hidden states by token masks, the guide loss in its paper, released and contrastive
forms, the request-token guide (tga.align.request_guide), the running caption centre, the alignment-specificity
diagnostic, and the choice of target layers; the guide's options, typed and checked once (tga.align.guide_config);
around them `Guide` (tga.align.guide), the whole guide term of a training step (target source, centre, accumulation
scaling, metrics), and the caption-state bank (tga.align.bank), the fixed target computed once. The trainer adds the
guide's term to the language-modelling loss. Under ZeRO-3 the bank gathers parameters and the shared caption pass
marks layers for DeepSpeed; nothing else here touches DeepSpeed.
"""

from tga.align.centering import CaptionCenter
from tga.align.layers import auto_band, load_activation_layer, parse_layer_spec
from tga.align.metrics import apply_center, cosine_matrix, paired_cosine, specificity
from tga.align.pooling import masked_mean, pool_layers
from tga.align.request_guide import request_spans, request_token_loss
from tga.align.tga_loss import FORMS, GuideTerms, LossForm, guide_loss, guide_terms

__all__ = [
    "FORMS",
    "CaptionCenter",
    "GuideTerms",
    "LossForm",
    "apply_center",
    "auto_band",
    "cosine_matrix",
    "guide_loss",
    "guide_terms",
    "load_activation_layer",
    "masked_mean",
    "paired_cosine",
    "parse_layer_spec",
    "pool_layers",
    "request_spans",
    "request_token_loss",
    "specificity",
]
