"""tga/caption

Caption generation for training images: a `Captioner` over any HF image-to-text model and the resumable
`tga caption` job that fills each record's `image_caption` (C), the target text of the TGA guide loss.
"""

from tga.caption.captioner import Captioner
from tga.caption.run import CaptionConfig, caption_file, caption_records, needs_caption

__all__ = ["CaptionConfig", "Captioner", "caption_file", "caption_records", "needs_caption"]
