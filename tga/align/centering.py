"""tga/align/centering.py

A running mean of pooled caption states per target layer, used to centre the guide loss. Caption states
of one layer share a dominant direction (format, norm), so an uncentred cosine between image and caption
states mostly rewards that shared direction; subtracting the running caption mean first makes the cosine
measure content. The mean is an exponential moving average kept in a float32 buffer (saved with a state
dict); under torch.distributed every rank folds in the same all-reduced batch mean, so all ranks hold the
same centre. An update never reads a value back to the host (no device synchronisation per step). `save` /
`load` keep it in a checkpoint (`tga.align.guide`).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from tga.errors import ConfigError


class CaptionCenter(nn.Module):
    """Exponential moving average of caption states, one H-vector per target layer.

    Args:
        num_layers: Number of target layers L (rows of the centre).
        hidden_size: Hidden size H of the LLM.
        momentum: EMA momentum m in [0, 1): after initialisation each update sets
            mean <- m * mean + (1 - m) * batch_mean.
    """

    def __init__(self, num_layers: int, hidden_size: int, momentum: float = 0.99) -> None:
        super().__init__()
        if num_layers < 1 or hidden_size < 1:
            raise ConfigError(
                f"--tga_layers: a caption centre needs >= 1 layer and hidden size, got {num_layers}, {hidden_size}"
            )
        if not 0.0 <= momentum < 1.0:
            raise ConfigError(f"--tga_center_momentum: must lie in [0, 1), got {momentum}")
        self.momentum = float(momentum)
        self.register_buffer("mean", torch.zeros(num_layers, hidden_size, dtype=torch.float32))
        # A buffer rather than a Python bool so that the flag survives save/load with the mean.
        self.register_buffer("_initialized", torch.zeros((), dtype=torch.bool))

    @property
    def initialized(self) -> bool:
        """Whether at least one batch has been folded in (before that the centre is all zeros)."""
        return bool(self._initialized.item())

    @torch.no_grad()
    def update(self, caption_states: Tensor) -> None:
        """Fold a batch of pooled caption states into the running mean.

        The first update sets the mean to the batch mean; later ones apply the EMA. When torch.distributed
        is initialised this is a collective: every rank must call it at each step (a rank with no captioned
        sample passes an empty batch [L, 0, H]); the batch mean is then the sample-weighted mean over all
        ranks. A step whose batches are empty on every rank leaves the centre unchanged.

        Args:
            caption_states: Pooled caption states [L, B, H] (any dtype; no gradient is recorded).

        Raises:
            ConfigError: the states do not have this centre's layer count and hidden size.
        """
        num_layers, hidden_size = self.mean.shape
        if caption_states.dim() != 3 or caption_states.shape[0] != num_layers or caption_states.shape[2] != hidden_size:
            raise ConfigError(
                f"--tga_layers: caption states of shape {tuple(caption_states.shape)} do not fit a caption centre "
                f"of {num_layers} layers x hidden size {hidden_size}"
            )
        if self.mean.dtype != torch.float32:
            # A model-wide .half()/.to(bf16) also casts buffers; the running mean must stay float32.
            self.mean = self.mean.float()
        states = caption_states.detach().to(device=self.mean.device, dtype=torch.float32)
        # Sum and sample count travel in one buffer so that a single all_reduce gives the global mean.
        packed = torch.cat([states.sum(dim=1).flatten(), states.new_tensor([float(states.shape[1])])])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(packed)
        # Computed on the device, without reading the count back: the step never waits for the accelerator.
        count = packed[-1]
        batch_mean = packed[:-1].view(num_layers, hidden_size) / count.clamp(min=1.0)
        blended = torch.where(self._initialized, self.momentum * self.mean + (1.0 - self.momentum) * batch_mean,
                              batch_mean)
        self.mean.copy_(torch.where(count > 0, blended, self.mean))
        self._initialized.logical_or_(count > 0)

    def forward(self) -> Tensor:
        """Return the current centre [L, H] (float32)."""
        return self.mean.float()

    def save(self, path: str, layers: list[int]) -> str:
        """Write the centre to a safetensors file, atomically (whole or absent); `layers` go into its metadata."""
        tensors = {"center.mean": self.mean.detach().float().cpu().contiguous(),
                   "center.initialized": self._initialized.detach().cpu().reshape(1)}
        temporary = f"{path}.tmp-{os.getpid()}"
        save_file(tensors, temporary, metadata={"layers": ",".join(map(str, layers))})
        os.replace(temporary, path)
        return path

    def load(self, path: str) -> None:
        """Restore a centre written by `save`; one of another shape (other --tga_layers or model) is refused."""
        state = load_file(path)
        if tuple(state["center.mean"].shape) != tuple(self.mean.shape):
            raise ConfigError(f"--tga_layers: {path} holds a caption centre of shape "
                              f"{tuple(state['center.mean'].shape)}, this run needs {tuple(self.mean.shape)}")
        with torch.no_grad():
            self.mean.copy_(state["center.mean"].to(self.mean.device))
            self._initialized.fill_(bool(state["center.initialized"].item()))
