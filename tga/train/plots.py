"""tga/train/plots.py

Training curves written next to the model at the end of a stage: `loss_curve.png` (total loss, and the guide loss
and mean cos(I, C) when TGA is on) from the Trainer's log history.
"""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_training_curves(log_history: list[dict], output_dir: str) -> str | None:
    steps = [entry["step"] for entry in log_history if "loss" in entry]
    if not steps:
        return None
    cos_keys = sorted({key for entry in log_history for key in entry if key.startswith("tga/cos_ic/")})
    panels = 2 if cos_keys else 1
    figure, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 3.6), squeeze=False)
    axis = axes[0][0]
    axis.plot(steps, [entry["loss"] for entry in log_history if "loss" in entry], label="loss (CE + guide)")
    guide = [(entry["step"], entry["tga/guide_loss"]) for entry in log_history if "tga/guide_loss" in entry]
    if guide:
        axis.plot(*zip(*guide), label="guide loss")
    axis.set_xlabel("step")
    axis.legend()
    axis.set_title("training loss")
    if cos_keys:
        axis = axes[0][1]
        for key in cos_keys:
            points = [(entry["step"], entry[key]) for entry in log_history if key in entry]
            axis.plot(*zip(*points), label=key.split("/")[-1])
        axis.set_xlabel("step")
        axis.set_title("cos(image, caption) per target layer")
        axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    path = os.path.join(output_dir, "loss_curve.png")
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
