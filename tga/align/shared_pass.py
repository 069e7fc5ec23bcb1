"""tga/align/shared_pass.py

The live target's caption pass riding the training forward, so that under ZeRO-3 it shares each decoder layer's
parameter all-gather instead of gathering the layers up to the deepest target layer a second time per step.

How: forward hooks (registered first, `prepend=True`) on the LLM's token embedding and on decoder layers 1 .. depth
(and on the final norm when the depth is the last layer, whose state the model returns normed), which exist only
for the duration of one training forward (`riding`). Each runs once per forward, right after the module's training forward and before any hook registered earlier (DeepSpeed's
release hook among them), while the module's parameters are still gathered: under no-grad it sends the caption
batch through the same module by calling `module.forward` directly, so no module hook (DeepSpeed's included) fires
for it. The embedding hook also builds the layer inputs (causal mask, positions, rotary embeddings) with the code of
the separate pass (`tga.model.text_states.layer_inputs`), so the states are those of `text_hidden_states`, bit for
bit. No collective runs in a hook: a rank without guide samples arms nothing and still runs the same modules.

Under ZeRO-3 the decoder layers up to the depth are marked DeepSpeed "leaf" modules (`set_z3_leaf_module`, before
the engine is built): a leaf's whole parameter set is gathered in its own pre-forward hook and its children get no
hooks, so the parameters of a whole layer are live when its hook runs (without it DeepSpeed gathers and releases
each linear layer on its own). Gradient checkpointing recomputes a layer's `forward` inside backward, where module
hooks do not run (transformers checkpoints `forward`, not `__call__`), and the pass is disarmed by then anyway.

Where it cannot hold (`tga.align.guide_config.GuideConfig.caption_source`): a frozen target (another module than the training forward's), a model
family whose forward the project does not mirror (`supports_partial_pass`), or a caption-state bank.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial

import torch

from tga.model.text_states import layer_inputs


class SharedCaptionPass:
    """Caption hidden states `[0 .. depth]` computed inside the training forward of `language_model`.

    `with shared.riding(ids, attention): <training forward>` then `shared.take()`. The hooks are registered on
    entering `riding` and removed on leaving it: nothing stays on the model between forwards.
    """

    def __init__(self, language_model, depth: int, *, zero3: bool | None = None):
        self.language_model = language_model
        self.depth = depth
        layers = language_model.layers[:depth]
        if zero3 is None:  # the Trainer's arguments name a ZeRO-3 DeepSpeed config (HF records it when built)
            from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

            zero3 = is_deepspeed_zero3_enabled()
        if zero3:  # one gather per decoder layer (see the module note); must precede deepspeed.initialize
            from deepspeed.utils import set_z3_leaf_module

            for layer in layers:
                set_z3_leaf_module(layer, True)
        self.normed = depth >= language_model.config.num_hidden_layers  # the last state is taken after the norm
        self.captions = None  # (ids, attention) of the armed forward
        self.inputs = None  # the layer inputs of the armed forward
        self.states: list[torch.Tensor] | None = None  # None: nothing armed since the last take()
        self.modules = [(language_model.embed_tokens, self._embed),
                        *((layer, partial(self._layer, i)) for i, layer in enumerate(layers)),
                        *([(language_model.norm, self._norm)] if self.normed else [])]

    @contextmanager
    def riding(self, ids: torch.Tensor | None, attention: torch.Tensor | None):
        """Run the caption batch (ids, attention) through the training forward inside this block (ids None: this
        micro-batch has no captions; `take()` then gives an empty tuple)."""
        self.states, self.inputs = [], None
        if ids is None:
            yield
            return
        self.captions = (ids, attention)
        handles = [module.register_forward_hook(hook, prepend=True) for module, hook in self.modules]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self.captions, self.inputs = None, None

    def take(self) -> tuple[torch.Tensor, ...] | None:
        """The states of the last armed forward (an empty tuple when it had no captions); None when no forward was
        armed since the last call."""
        states, self.states = self.states, None
        if states is None:
            return None
        if states and len(states) != self.depth + 1 + (1 if self.normed else 0):
            raise RuntimeError(f"the training forward ran {len(states) - 1} of the {self.depth} decoder layers the "
                               "shared caption pass needs")
        return tuple(states[:-2] + states[-1:]) if self.normed and states else tuple(states)

    # ---- hooks: after the module's training forward, while its parameters are gathered ----
    def _embed(self, module, args, output):
        if self.captions is None or self.states:  # not armed, or already embedded in this forward
            return
        ids, attention = self.captions
        with torch.no_grad():
            embeds = module.forward(ids)
            self.inputs = layer_inputs(self.language_model, embeds, attention)
        self.states.append(embeds)

    def _layer(self, index: int, module, args, output):
        if self.captions is None or len(self.states) != index + 1:  # not armed, or not this layer's turn
            return
        with torch.no_grad():
            self.states.append(module.forward(self.states[-1], **self.inputs))

    def _norm(self, module, args, output):
        if self.captions is None or len(self.states) != self.depth + 1:
            return
        with torch.no_grad():
            self.states.append(module.forward(self.states[-1]))
