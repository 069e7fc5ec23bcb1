"""tga/train/tracking.py

Experiment tracking beyond what HF's reporting callbacks log: the resolved tga configuration (all four argument
groups) and the git revision go into the W&B run's config, so a run can be reproduced from its page. The per-layer TGA
metrics reach every `--report_to` backend through `Trainer.log` (tga/train/trainer.py).
"""

from __future__ import annotations

import subprocess

from transformers import TrainerCallback


def git_revision(directory: str = ".") -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=directory, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


class ResolvedConfigCallback(TrainerCallback):
    """Adds the resolved configuration to the W&B run once the W&B callback has started it (rank 0 only)."""

    def __init__(self, resolved: dict):
        self.resolved = resolved

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or "wandb" not in (args.report_to or []):
            return
        import wandb

        if wandb.run is not None:
            wandb.run.config.update({"tga": self.resolved}, allow_val_change=True)
