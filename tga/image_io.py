"""tga/image_io.py

Resolving a record's image path under the image folder and opening it as RGB, with errors that name the
record and the path. A path that escapes the folder (`../`, or an absolute path elsewhere) is rejected. The
check is lexical: symbolic links placed inside the folder (a common way to assemble datasets) are followed.
"""

from __future__ import annotations

import os
import warnings

from PIL import Image

from tga.errors import DataError


def resolve_image_path(image_folder: str, relative: str, label: str) -> str:
    """Join a record's `image` field to the image folder, refusing paths that leave it.

    Args:
        image_folder: the folder all images must live in.
        relative: the record's `image` value (relative to the folder, or absolute inside it).
        label: how errors name the record, e.g. "id 'abc'".

    Returns:
        The absolute, normalised path of the image.
    """
    if not isinstance(relative, str) or not relative.strip():
        raise DataError(f"record {label}: 'image' must be a non-empty path string, got {relative!r}")
    folder = os.path.abspath(image_folder)
    path = os.path.normpath(os.path.join(folder, relative))  # an absolute `relative` replaces `folder`
    if os.path.commonpath([folder, path]) != folder:
        raise DataError(f"record {label}: image path {relative!r} resolves outside the image folder {folder}")
    return path


def open_image(path: str, label: str) -> Image.Image:
    """Open and fully decode an image as RGB.

    Args:
        path: the image file.
        label: how errors name the record.

    Returns:
        The decoded RGB image.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # a bomb is a bad record, not a hang
            with Image.open(path) as image:
                image.load()  # decode now, so a truncated file fails here and not later
                return image.convert("RGB")
    except FileNotFoundError as error:
        raise DataError(f"record {label}: image not found: {path}") from error
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
        raise DataError(f"record {label}: cannot read image {path} ({type(error).__name__}: {error})") from error
