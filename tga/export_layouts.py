"""tga/export_layouts.py

The folder formats and transformers layouts that `tga export` writes (tga/export.py), named apart from the
converters so that the command line lists them without loading torch.
"""

FORMATS = ("hf-llava",)
LAYOUTS = ("transformers5", "transformers4")  # the key names, config fields and tokenizer files of that version
