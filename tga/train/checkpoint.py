"""tga/train/checkpoint.py

Saving and loading what the stages produce, atomically and in HF-native formats:
- stage 1: `mm_projector.safetensors` (projector tensors, keys relative to the projector, e.g. `linear_1.weight`);
- stage 2: a full `LlavaForConditionalGeneration` folder (safetensors) with tokenizer and `LlavaProcessor`.
`load_projector` also reads LLaVA's stage-1 `mm_projector.bin` (keys `model.mm_projector.{0,2}.*`), with
`torch.load(weights_only=True)` so that no pickled code can run.
"""

from __future__ import annotations

import os
import pickle

import torch
from safetensors.torch import load_file, save_file

from tga.data.chat_templates import chat_template
from tga.errors import ConfigError
from tga.model.processor import build_processor
from tga.model.projector import llava_projector_state
from tga.model.vlm import weight_files
from tga.ranks import gathered, is_main_process

PROJECTOR_FILE = "mm_projector.safetensors"


def atomic_save_file(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file under a temporary name, then rename: a crash never leaves a half-written file."""
    temporary = f"{path}.tmp-{os.getpid()}"
    save_file(tensors, temporary, metadata=metadata)
    os.replace(temporary, path)


def save_projector(model, output_dir: str) -> str:
    """Gather the (possibly ZeRO-3 partitioned) projector on every rank; rank 0 writes it. Returns the file path."""
    projector = model.model.multi_modal_projector
    with gathered(list(projector.parameters())):
        state = {name: tensor.detach().cpu().clone().contiguous() for name, tensor in projector.state_dict().items()}
    path = os.path.join(output_dir, PROJECTOR_FILE)
    if is_main_process():
        os.makedirs(output_dir, exist_ok=True)
        metadata = {"mm_projector_type": str(getattr(model.config, "mm_projector_type", "mlp2x_gelu"))}
        atomic_save_file(state, path, metadata)
    return path


def read_projector_state(path: str) -> dict[str, torch.Tensor]:
    """Projector tensors from our safetensors file, a LLaVA `mm_projector.bin`, or a folder holding either."""
    if os.path.isdir(path):
        for name in (PROJECTOR_FILE, "mm_projector.bin"):
            if os.path.exists(os.path.join(path, name)):
                return read_projector_state(os.path.join(path, name))
        raise ConfigError(f"--pretrain_mm_mlp_adapter: no {PROJECTOR_FILE} or mm_projector.bin in {path}")
    if not os.path.isfile(path):
        raise ConfigError(f"--pretrain_mm_mlp_adapter: file not found: {path}")
    if path.endswith(".safetensors"):
        return load_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # the file holds objects (possibly code), not just tensors
        raise ConfigError(f"--pretrain_mm_mlp_adapter {path}: refused, the file holds pickled objects that are not "
                          "tensors; convert it to safetensors from a trusted environment") from error
    converted, unknown = llava_projector_state(state)
    if unknown:
        raise ConfigError(f"--pretrain_mm_mlp_adapter {path}: keys that are not LLaVA projector keys: {unknown}")
    return converted


def load_projector(model, path: str) -> None:
    """Load stage-1 projector weights into the model's projector (before the DeepSpeed engine is built)."""
    projector = model.model.multi_modal_projector
    state = read_projector_state(path)
    expected = set(projector.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ConfigError(
            f"--pretrain_mm_mlp_adapter {path} does not fit a `{getattr(model.config, 'mm_projector_type', '?')}` "
            f"projector: missing {missing}, unexpected {unexpected}"
        )
    with gathered(list(projector.parameters())):
        for name, tensor in projector.state_dict().items():
            if state[name].shape != tensor.shape:
                raise ConfigError(f"--pretrain_mm_mlp_adapter {path}: `{name}` has shape {tuple(state[name].shape)}, "
                                  f"the model expects {tuple(tensor.shape)}")
            with torch.no_grad():
                tensor.copy_(state[name].to(tensor.dtype))


def save_model_folder(trainer, model, tokenizer, image_processor, output_dir: str) -> None:
    """A complete HF model folder: weights (consolidated from ZeRO-3 by the Trainer), tokenizer and processor."""
    trainer.save_model(output_dir)
    if is_main_process():
        # The chat template makes apply_chat_template (transformers, vLLM, lmms-eval) format prompts as training did.
        tokenizer.chat_template = chat_template(getattr(model.config, "tga_template", None) or "llava_llama_2")
        tokenizer.save_pretrained(output_dir)
        build_processor(model, tokenizer, image_processor).save_pretrained(output_dir)


def load_checkpoint_weights(model, folder: str) -> None:
    """Load the weights of a `checkpoint-N` folder written by `Trainer.save_model` (single process, no DeepSpeed).

    transformers 5 saves a Llava model under the layout its conversion mapping writes (`language_model.model.*`,
    `multi_modal_projector.*`) but the Trainer's resume loads the file with a raw `load_state_dict`, which matches
    none of those keys and leaves the model as it was built. The saved names are mapped back to the model's own.
    """
    from safetensors import safe_open
    from transformers.core_model_loading import revert_weight_conversion

    own = model.state_dict()
    saved_name = {}
    for name, tensor in own.items():  # one key at a time: Llava's conversions are renamings, one name to one
        saved_name[next(iter(revert_weight_conversion(model, {name: tensor})))] = name
    state = {}
    for file in weight_files(folder):
        path = os.path.join(folder, file)
        if not os.path.isfile(path):
            raise ConfigError(f"--resume_from_checkpoint {folder}: {file} is missing")
        with safe_open(path, framework="pt") as handle:
            for key in handle.keys():
                state[saved_name.get(key, key)] = handle.get_tensor(key)
    result = model.load_state_dict(state, strict=False)
    tied = {name for name in result.missing_keys if getattr(model.config, "tie_word_embeddings", False)
            and name.endswith("lm_head.weight")}
    if set(result.missing_keys) - tied or result.unexpected_keys:
        raise ConfigError(f"--resume_from_checkpoint {folder}: the saved weights do not fit the model "
                          f"(missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]})")
