"""tga/model

The vision-language model: vision towers, projectors, the tokenizer, and the assembly of an HF-native
`LlavaForConditionalGeneration` from a pretrained LLM, a CLIP vision tower and a projector.
"""
