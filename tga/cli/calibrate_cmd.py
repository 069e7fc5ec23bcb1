"""tga/cli/calibrate_cmd.py

`tga calibrate cmrm --model DIR --data FILE --out FILE`: measures CMRM's per-layer shift between image-conditioned and
text-only (caption) inputs on a calibration set and writes it as a safetensors file, which `--defense cmrm
--cmrm_file FILE` then loads. Data, images and the model folder are checked before the model is loaded. Thin: the
work is in `tga.defense.calibrate`.
"""

from __future__ import annotations

import argparse


def _cmrm(args: argparse.Namespace) -> int:
    from tga.defense.calibrate import calibrate_cmrm, load_calibration_items
    from tga.errors import ConfigError
    from tga.safety.io import check_images, ensure_model_dir
    from tga.safety.loading import load_chat

    ensure_model_dir(args.model)
    if args.max_samples is not None and args.max_samples < 1:
        raise ConfigError(f"--max_samples must be at least 1, got {args.max_samples}")
    items = load_calibration_items(args.data, args.image_folder, question=args.question, max_samples=args.max_samples)
    check_images([item.image for item in items])
    chat = load_chat(args.model, device=args.device, dtype=args.dtype, template=args.template)
    calibration = calibrate_cmrm(chat, items, batch_size=args.batch_size)
    calibration.meta["model"] = args.model
    calibration.save(args.out)
    norms = calibration.shift.norm(dim=1)
    print(f"CMRM shift of {len(norms)} layers from {len(items)} images (norm per layer: "
          + ", ".join(f"{value:.3g}" for value in norms.tolist()) + f"); written to {args.out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `tga calibrate cmrm`."""
    parser = subparsers.add_parser("calibrate", help="calibrate an inference-time defence (CMRM)")
    kinds = parser.add_subparsers(dest="calibration", required=True, metavar="DEFENCE")
    cmrm = kinds.add_parser("cmrm", help="CMRM's per-layer shift between image and caption inputs (Liu et al. 2025)")
    cmrm.add_argument("--model", required=True, help="checkpoint folder (HF Llava) the defence will run on")
    cmrm.add_argument("--data", required=True,
                      help="JSON/JSONL of {image, caption, question?} or LLaVA records with image_caption")
    cmrm.add_argument("--image_folder", default=None, help="folder image paths are relative to (default: the file's)")
    cmrm.add_argument("--out", required=True, help="calibration file to write (safetensors)")
    cmrm.add_argument("--question", default="Describe the image.",
                      help="request asked about every image where a record has no question of its own")
    cmrm.add_argument("--max_samples", type=int, default=None, help="use only the first N records")
    cmrm.add_argument("--batch_size", type=int, default=8, help="images per forward pass")
    cmrm.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    cmrm.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                      help="model dtype (default: float32)")
    cmrm.add_argument("--template", default=None, help="conversation template instead of the model's own")
    cmrm.set_defaults(func=_cmrm)
