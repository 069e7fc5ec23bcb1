"""tga/demo/render.py

Draws the demo world's scenes with PIL primitives. Each concept is a glyph drawn in unit coordinates on a
transparent layer (holes are cut back to transparent, so the background shows through them whatever the colour),
rotated, and pasted at its position on a textured grey background. The scene is drawn `render_scale` times larger
than the output and downsampled, then pixel noise is added; everything comes from the `Scene`, so an image is a
pure function of its scene and the image size.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from tga.demo.world import COLOURS, MULTI_OBJECT_SCALE, POSITIONS, SIZES, Scene, WorldObject

CLEAR = (0, 0, 0, 0)
Glyph = Callable[[ImageDraw.ImageDraw, Callable, tuple], None]


def _poly(d, p, points, fill):
    d.polygon([p(x, y) for x, y in points], fill=fill)


def _box(p, x0, y0, x1, y1):
    return [*p(x0, y0), *p(x1, y1)]


def _star(d, p, c):
    points = []
    for k in range(10):
        radius = 0.46 if k % 2 == 0 else 0.19
        angle = -math.pi / 2 + k * math.pi / 5
        points.append((0.5 + radius * math.cos(angle), 0.53 + radius * math.sin(angle)))
    _poly(d, p, points, c)


def _flower(d, p, c):
    for k in range(5):
        angle = k * 2 * math.pi / 5
        x, y = 0.5 + 0.26 * math.cos(angle), 0.5 + 0.26 * math.sin(angle)
        d.ellipse(_box(p, x - 0.19, y - 0.19, x + 0.19, y + 0.19), fill=c)
    d.ellipse(_box(p, 0.42, 0.42, 0.58, 0.58), fill=CLEAR)


def _sun(d, p, c):
    d.ellipse(_box(p, 0.3, 0.3, 0.7, 0.7), fill=c)
    for k in range(8):
        angle = k * math.pi / 4
        inner, outer = p(0.5 + 0.27 * math.cos(angle), 0.5 + 0.27 * math.sin(angle)), \
            p(0.5 + 0.47 * math.cos(angle), 0.5 + 0.47 * math.sin(angle))
        d.line([inner, outer], fill=c, width=max(1, int(p(0.08, 0)[0])))


def _cigarette(d, p, c):
    d.rectangle(_box(p, 0.1, 0.42, 0.72, 0.6), fill=c)
    filter_colour = (205, 130, 60, 255)  # the filter and the glowing tip keep their colours: they define the object
    d.rectangle(_box(p, 0.72, 0.42, 0.97, 0.6), fill=filter_colour)
    d.rectangle(_box(p, 0.03, 0.42, 0.1, 0.6), fill=(255, 90, 20, 255))
    for k, x in enumerate((0.04, 0.16)):
        d.arc(_box(p, x, 0.1 + 0.06 * k, x + 0.16, 0.4), 200, 340, fill=(225, 225, 225, 255),
              width=max(1, int(p(0.05, 0)[0])))


def _gun(d, p, c):
    d.rectangle(_box(p, 0.05, 0.27, 0.88, 0.43), fill=c)  # barrel and slide
    _poly(d, p, [(0.58, 0.4), (0.88, 0.4), (0.92, 0.9), (0.68, 0.9)], c)  # grip
    d.ellipse(_box(p, 0.42, 0.36, 0.66, 0.66), fill=c)  # trigger guard
    d.ellipse(_box(p, 0.48, 0.44, 0.6, 0.58), fill=CLEAR)
    d.rectangle(_box(p, 0.05, 0.2, 0.11, 0.28), fill=c)  # front sight


def _skull(d, p, c):
    d.ellipse(_box(p, 0.14, 0.06, 0.86, 0.7), fill=c)
    d.rectangle(_box(p, 0.3, 0.55, 0.7, 0.9), fill=c)
    d.ellipse(_box(p, 0.26, 0.3, 0.46, 0.5), fill=CLEAR)
    d.ellipse(_box(p, 0.54, 0.3, 0.74, 0.5), fill=CLEAR)
    _poly(d, p, [(0.5, 0.52), (0.44, 0.64), (0.56, 0.64)], CLEAR)
    for x in (0.4, 0.5, 0.6):
        d.rectangle(_box(p, x - 0.02, 0.74, x + 0.02, 0.9), fill=CLEAR)


def _knife(d, p, c):
    _poly(d, p, [(0.02, 0.52), (0.2, 0.36), (0.6, 0.3), (0.6, 0.6), (0.2, 0.6)], c)  # broad blade, pointed tip
    d.rectangle(_box(p, 0.6, 0.22, 0.67, 0.68), fill=c)  # guard
    d.rectangle(_box(p, 0.67, 0.37, 0.98, 0.55), fill=c)  # handle
    for x in (0.76, 0.88):
        d.ellipse(_box(p, x - 0.035, 0.42, x + 0.035, 0.5), fill=CLEAR)


GLYPHS: dict[str, Glyph] = {
    "circle": lambda d, p, c: d.ellipse(_box(p, 0.08, 0.08, 0.92, 0.92), fill=c),
    "square": lambda d, p, c: d.rectangle(_box(p, 0.13, 0.13, 0.87, 0.87), fill=c),
    "triangle": lambda d, p, c: _poly(d, p, [(0.5, 0.08), (0.93, 0.88), (0.07, 0.88)], c),
    "star": _star,
    "cross": lambda d, p, c: (d.rectangle(_box(p, 0.37, 0.06, 0.63, 0.94), fill=c),
                              d.rectangle(_box(p, 0.06, 0.37, 0.94, 0.63), fill=c)),
    "heart": lambda d, p, c: (d.ellipse(_box(p, 0.08, 0.12, 0.53, 0.57), fill=c),
                              d.ellipse(_box(p, 0.47, 0.12, 0.92, 0.57), fill=c),
                              _poly(d, p, [(0.1, 0.42), (0.9, 0.42), (0.5, 0.92)], c)),
    "diamond": lambda d, p, c: _poly(d, p, [(0.5, 0.04), (0.84, 0.5), (0.5, 0.96), (0.16, 0.5)], c),
    "ring": lambda d, p, c: (d.ellipse(_box(p, 0.08, 0.08, 0.92, 0.92), fill=c),
                             d.ellipse(_box(p, 0.3, 0.3, 0.7, 0.7), fill=CLEAR)),
    "moon": lambda d, p, c: (d.ellipse(_box(p, 0.08, 0.08, 0.92, 0.92), fill=c),
                             d.ellipse(_box(p, 0.34, -0.02, 1.12, 0.78), fill=CLEAR)),
    "arrow": lambda d, p, c: (d.rectangle(_box(p, 0.06, 0.41, 0.58, 0.59), fill=c),
                              _poly(d, p, [(0.52, 0.16), (0.96, 0.5), (0.52, 0.84)], c)),
    "house": lambda d, p, c: (d.rectangle(_box(p, 0.2, 0.46, 0.8, 0.92), fill=c),
                              _poly(d, p, [(0.08, 0.5), (0.5, 0.08), (0.92, 0.5)], c),
                              d.rectangle(_box(p, 0.42, 0.64, 0.58, 0.92), fill=CLEAR)),
    "tree": lambda d, p, c: (d.rectangle(_box(p, 0.41, 0.55, 0.59, 0.96), fill=c),
                             d.ellipse(_box(p, 0.14, 0.04, 0.86, 0.66), fill=c)),
    "cup": lambda d, p, c: (d.ellipse(_box(p, 0.52, 0.3, 0.92, 0.72), fill=c),
                            d.ellipse(_box(p, 0.62, 0.41, 0.82, 0.61), fill=CLEAR),
                            _poly(d, p, [(0.12, 0.2), (0.7, 0.2), (0.64, 0.88), (0.18, 0.88)], c)),
    "key": lambda d, p, c: (d.ellipse(_box(p, 0.04, 0.28, 0.42, 0.72), fill=c),
                            d.ellipse(_box(p, 0.14, 0.4, 0.3, 0.6), fill=CLEAR),
                            d.rectangle(_box(p, 0.38, 0.44, 0.96, 0.56), fill=c),
                            d.rectangle(_box(p, 0.74, 0.56, 0.81, 0.72), fill=c),
                            d.rectangle(_box(p, 0.87, 0.56, 0.94, 0.68), fill=c)),
    "umbrella": lambda d, p, c: (d.pieslice(_box(p, 0.04, 0.1, 0.96, 0.92), 180, 360, fill=c),
                                 d.rectangle(_box(p, 0.46, 0.5, 0.54, 0.84), fill=c),
                                 d.arc(_box(p, 0.3, 0.7, 0.54, 0.94), 0, 180, fill=c, width=max(1, int(p(0.08, 0)[0])))),
    "flower": _flower,
    "bell": lambda d, p, c: (_poly(d, p, [(0.3, 0.25), (0.7, 0.25), (0.88, 0.76), (0.12, 0.76)], c),
                             d.ellipse(_box(p, 0.3, 0.08, 0.7, 0.42), fill=c),
                             d.ellipse(_box(p, 0.41, 0.76, 0.59, 0.94), fill=c)),
    "sun": _sun,
    "fish": lambda d, p, c: (d.ellipse(_box(p, 0.04, 0.24, 0.7, 0.76), fill=c),
                             _poly(d, p, [(0.6, 0.5), (0.96, 0.2), (0.96, 0.8)], c),
                             d.ellipse(_box(p, 0.15, 0.38, 0.27, 0.5), fill=CLEAR)),
    "boat": lambda d, p, c: (_poly(d, p, [(0.04, 0.62), (0.96, 0.62), (0.78, 0.9), (0.22, 0.9)], c),
                             d.rectangle(_box(p, 0.46, 0.08, 0.53, 0.62), fill=c),
                             _poly(d, p, [(0.56, 0.1), (0.56, 0.56), (0.9, 0.56)], c)),
    "cloud": lambda d, p, c: (d.ellipse(_box(p, 0.04, 0.4, 0.44, 0.78), fill=c),
                              d.ellipse(_box(p, 0.26, 0.18, 0.72, 0.66), fill=c),
                              d.ellipse(_box(p, 0.54, 0.34, 0.96, 0.78), fill=c),
                              d.rectangle(_box(p, 0.24, 0.5, 0.76, 0.78), fill=c)),
    "hat": lambda d, p, c: (d.rectangle(_box(p, 0.04, 0.7, 0.96, 0.82), fill=c),
                            d.rectangle(_box(p, 0.24, 0.16, 0.76, 0.72), fill=c),
                            d.rectangle(_box(p, 0.24, 0.54, 0.76, 0.62), fill=CLEAR)),
    "lightning": lambda d, p, c: _poly(d, p, [(0.56, 0.03), (0.18, 0.56), (0.44, 0.56), (0.32, 0.97), (0.82, 0.4),
                                              (0.55, 0.4), (0.72, 0.03)], c),
    "flag": lambda d, p, c: (d.rectangle(_box(p, 0.1, 0.04, 0.19, 0.96), fill=c),
                             d.rectangle(_box(p, 0.19, 0.07, 0.9, 0.5), fill=c)),
    "hourglass": lambda d, p, c: _poly(d, p, [(0.18, 0.06), (0.82, 0.06), (0.54, 0.5), (0.82, 0.94), (0.18, 0.94),
                                              (0.46, 0.5)], c),
    "car": lambda d, p, c: (d.rectangle(_box(p, 0.04, 0.44, 0.96, 0.72), fill=c),
                            _poly(d, p, [(0.24, 0.45), (0.34, 0.2), (0.66, 0.2), (0.76, 0.45)], c),
                            d.rectangle(_box(p, 0.38, 0.27, 0.62, 0.42), fill=CLEAR),
                            d.ellipse(_box(p, 0.12, 0.6, 0.36, 0.84), fill=c),
                            d.ellipse(_box(p, 0.64, 0.6, 0.88, 0.84), fill=c)),
    "knife": _knife,
    "gun": _gun,
    "cigarette": _cigarette,
    "skull": _skull,
}


def object_layer(obj: WorldObject, extent: int) -> Image.Image:
    """The object's glyph on a transparent square layer of side `extent` pixels, rotated."""
    layer = Image.new("RGBA", (extent, extent), CLEAR)
    draw = ImageDraw.Draw(layer)
    colour = COLOURS[obj.colour] + (255,)
    GLYPHS[obj.concept](draw, lambda x, y: (x * (extent - 1), y * (extent - 1)), colour)
    return layer.rotate(obj.rotation, resample=Image.BILINEAR, expand=True)


def background(scene: Scene, side: int) -> np.ndarray:
    """The scene's textured grey background, [side, side, 3] float (texture contrast stays low)."""
    rng = np.random.default_rng(scene.texture_seed)
    y, x = np.mgrid[0:side, 0:side] / side
    tint = rng.uniform(-12, 12, size=3)  # a faint colour cast
    if scene.background == "stripes":
        angle, freq = rng.uniform(0, math.pi), rng.uniform(4, 9)
        pattern = np.sign(np.sin(2 * math.pi * freq * (x * math.cos(angle) + y * math.sin(angle))))
    elif scene.background == "dots":
        freq = rng.uniform(5, 9)
        pattern = ((np.sin(2 * math.pi * freq * x) * np.sin(2 * math.pi * freq * y)) > 0.6) * 2.0 - 1.0
    elif scene.background == "gradient":
        angle = rng.uniform(0, 2 * math.pi)
        pattern = 2 * (x * math.cos(angle) + y * math.sin(angle)) - 1
    elif scene.background == "checker":
        cells = int(rng.integers(3, 7))
        pattern = ((np.floor(x * cells) + np.floor(y * cells)) % 2) * 2.0 - 1.0
    else:
        pattern = np.zeros_like(x)
    level = scene.background_level + rng.uniform(6, 12) * pattern
    return np.clip(level[..., None] + tint, 0, 255)


def render_scene(scene: Scene, image_size: int, render_scale: int = 3) -> Image.Image:
    """The RGB image of `scene`, `image_size` pixels square."""
    side = image_size * render_scale
    # The texture is computed at the output size (it is smooth) and blown up: downsampling gives it back exactly.
    texture = Image.fromarray(background(scene, image_size).round().astype(np.uint8), "RGB")
    canvas = texture.resize((side, side), Image.NEAREST)
    scale = 1.0 if len(scene.objects) == 1 else MULTI_OBJECT_SCALE
    for obj in scene.objects:
        extent = max(4, int(round(SIZES[obj.size] * scale * obj.scale_jitter * side)))
        layer = object_layer(obj, extent)
        cx, cy = POSITIONS[obj.position]
        x = int(round((cx + obj.offset[0]) * side - layer.width / 2))
        y = int(round((cy + obj.offset[1]) * side - layer.height / 2))
        canvas.paste(layer, (x, y), layer)
    small = np.asarray(canvas.resize((image_size, image_size), Image.BOX), dtype=np.float32)
    noise = np.random.default_rng(scene.texture_seed + 1).normal(0.0, scene.noise, small.shape)
    return Image.fromarray(np.clip(small + noise, 0, 255).round().astype(np.uint8), "RGB")


def _write_chunk(args: tuple[list[Scene], str, int, int]) -> int:
    scenes, folder, image_size, render_scale = args
    for scene in scenes:
        path = os.path.join(folder, scene.id + ".png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        render_scene(scene, image_size, render_scale).save(path, optimize=False, compress_level=1)
    return len(scenes)


def write_images(scenes: list[Scene], folder: str, image_size: int, render_scale: int = 3, *, workers: int = 2) -> None:
    """Render every scene to `folder/<scene.id>.png` (in `workers` processes; output does not depend on them)."""
    chunks = [(scenes[i:i + 500], folder, image_size, render_scale) for i in range(0, len(scenes), 500)]
    with tqdm(total=len(scenes), desc="rendering scenes", unit="img") as bar:
        if workers <= 1 or len(chunks) <= 1:
            for chunk in chunks:
                bar.update(_write_chunk(chunk))
            return
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for count in pool.map(_write_chunk, chunks):
                bar.update(count)
