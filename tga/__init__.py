"""tga: Text-Guided vision-language Alignment.

A LLaVA-style vision-language training framework (CLIP tower + MLP projector + causal LM, HF-native
checkpoints) whose stage losses can add the TGA guide loss, which pulls the LLM's hidden states of
image tokens toward those of the image's caption text so that the LLM's text safety also fires on images.
"""

__version__ = "0.1.0"
