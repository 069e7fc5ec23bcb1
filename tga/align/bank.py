"""tga/align/bank.py

The caption-state bank: TGA's caption target computed once where it cannot change during a stage (stage 1, where the
LLM is frozen; `--tga_target frozen`), then read per batch instead of running the caption pass.

A bank is a folder: `states.npy`, a memory-mapped array [records, target layers, hidden] holding each guided record's
pooled caption states (float16, float32 or bfloat16 stored as its 16 bits), and `bank.json`: the record ids (row
order), the target layers, the storage dtype and two fingerprints, one of the target LLM (its configuration and, per
parameter up to the deepest target layer, the sum and sum of squares) and one of the data (every guided record's id
and caption-pass token ids). Opening a bank whose layers, model or data differ from the run's is refused, naming what
differs. Building is a no-grad pass sharded over ranks (rank r computes rows r, r + world, ...; every rank runs the
same number of passes, as multi-rank ZeRO-3 requires); `bank.json` is written last, so a bank without it is incomplete
and is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import math
import os

import numpy as np
import torch

from tga.align.pooling import pool_layers
from tga.errors import ConfigError
from tga.model.text_states import caption_pass_modules, text_hidden_states
from tga.ranks import barrier, gathered

META_FILE, STATES_FILE = "bank.json", "states.npy"
STORAGE = {"float16": np.float16, "float32": np.float32, "bfloat16": np.uint16}  # bfloat16: its bits, as uint16


def model_fingerprint(language_model, depth: int) -> str:
    """A hash of the target LLM as the caption pass sees it (configuration, and per-parameter sums read once)."""
    parameters = [p for module in caption_pass_modules(language_model, depth) for p in module.parameters()]
    with gathered(parameters):
        stats = torch.stack([torch.stack([p.detach().double().sum(), p.detach().double().pow(2).sum()])
                             for p in parameters]).tolist()
    config = language_model.config
    described = [config.model_type, config.hidden_size, config.num_hidden_layers, depth, stats]
    return hashlib.sha256(json.dumps(described).encode()).hexdigest()


def data_fingerprint(rows: list[tuple[str, torch.Tensor, torch.Tensor]]) -> str:
    digest = hashlib.sha256()
    for record_id, ids, mask in rows:
        digest.update(record_id.encode() + b"\0" + ids.numpy().tobytes() + mask.numpy().tobytes())
    return digest.hexdigest()


class CaptionBank:
    """An opened bank: `lookup(ids)` gives pooled caption states [L, G, H] (float32) for record ids."""

    def __init__(self, folder: str):
        with open(os.path.join(folder, META_FILE), encoding="utf-8") as handle:
            self.meta = json.load(handle)
        self.folder = folder
        self.rows = {record_id: row for row, record_id in enumerate(self.meta["ids"])}
        self.states = np.load(os.path.join(folder, STATES_FILE), mmap_mode="r")

    @classmethod
    def open(cls, folder: str, *, layers: list[int], model: str | None, data: str) -> CaptionBank:
        """Open a complete bank built for these layers, this target model and this data; refuse a stale one.
        `model` None skips the model check (a resumed stage 2 has trained the LLM the bank was built from)."""
        bank = cls(folder)
        where = f"--tga_bank {folder}"
        if bank.meta["layers"] != list(layers):
            raise ConfigError(f"{where}: built for target layers {bank.meta['layers']}, this run aligns {list(layers)}; "
                              "remove the folder (it is rebuilt) or point --tga_bank elsewhere")
        if model is not None and bank.meta["model"] != model:
            raise ConfigError(f"{where}: built from another model (the target LLM's weights or shape differ); "
                              "remove the folder (it is rebuilt) or point --tga_bank elsewhere")
        if bank.meta["data"] != data:
            raise ConfigError(f"{where}: built from other data (the guided records or their captions differ); "
                              "remove the folder (it is rebuilt) or point --tga_bank elsewhere")
        return bank

    def lookup(self, record_ids: list[str], device) -> torch.Tensor:
        missing = [record_id for record_id in record_ids if record_id not in self.rows]
        if missing:
            raise ConfigError(f"--tga_bank {self.folder}: no caption states for records {missing[:3]}")
        values = np.ascontiguousarray(self.states[[self.rows[record_id] for record_id in record_ids]])
        tensor = torch.from_numpy(values)
        if self.meta["dtype"] == "bfloat16":
            tensor = tensor.view(torch.int16).view(torch.bfloat16)
        return tensor.to(device=device, dtype=torch.float32).permute(1, 0, 2)  # [G, L, H] -> [L, G, H]


def build_bank(folder: str, language_model, rows: list[tuple[str, torch.Tensor, torch.Tensor]], layers: list[int],
               *, dtype: str, pad_token_id: int, batch_size: int = 16, rank: int = 0, world_size: int = 1,
               model: str, data: str, device=None) -> None:
    """Compute and store the pooled caption states of `rows` ((record id, caption ids, caption mask), one per guided
    record); every rank calls it (the ranks share `folder`)."""
    if dtype not in STORAGE:
        raise ConfigError(f"--tga_bank_dtype: {dtype!r} is not one of {', '.join(STORAGE)}")
    device = device if device is not None else next(language_model.parameters()).device
    hidden = language_model.config.hidden_size
    path = os.path.join(folder, STATES_FILE)
    if rank == 0:
        os.makedirs(folder, exist_ok=True)
        if os.path.exists(os.path.join(folder, META_FILE)):
            os.remove(os.path.join(folder, META_FILE))  # rebuilt: incomplete until the new one is written
        np.lib.format.open_memmap(path, mode="w+", dtype=STORAGE[dtype], shape=(len(rows), len(layers), hidden))
    barrier()
    states = np.load(path, mmap_mode="r+")
    mine = list(range(rank, len(rows), world_size))
    passes = math.ceil(math.ceil(len(rows) / world_size) / batch_size) if rows else 0
    for index in range(passes):  # the same count on every rank; a rank out of rows runs a dummy pass, unwritten
        chunk = mine[index * batch_size:(index + 1) * batch_size]
        batch = [rows[row] for row in chunk] or [("", torch.tensor([pad_token_id]), torch.tensor([True]))]
        width = max(ids.numel() for _, ids, _ in batch)
        ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
        attention = torch.zeros(len(batch), width, dtype=torch.bool)
        mask = torch.zeros(len(batch), width, dtype=torch.bool)
        for line, (_, token_ids, caption_mask) in enumerate(batch):
            ids[line, :token_ids.numel()], attention[line, :token_ids.numel()] = token_ids, True
            mask[line, :caption_mask.numel()] = caption_mask
        with torch.no_grad():
            hidden_states = text_hidden_states(language_model, ids.to(device), attention.to(device), depth=max(layers))
            pooled = pool_layers(hidden_states, layers, mask.to(device)).permute(1, 0, 2).cpu()  # [B, L, H]
        if chunk:
            if dtype == "bfloat16":
                states[chunk] = pooled.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            else:
                states[chunk] = pooled.numpy().astype(STORAGE[dtype])
    states.flush()
    del states
    barrier()
    if rank == 0:
        meta = {"ids": [record_id for record_id, _, _ in rows], "layers": list(layers), "dtype": dtype,
                "model": model, "data": data, "hidden_size": hidden}
        temporary = os.path.join(folder, f"{META_FILE}.tmp")
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(meta, handle)
        os.replace(temporary, os.path.join(folder, META_FILE))
    barrier()


def open_or_build(folder: str, language_model, rows, layers: list[int], *, dtype: str, pad_token_id: int,
                  rank: int = 0, world_size: int = 1, batch_size: int = 16, resuming: bool = False) -> CaptionBank:
    """The bank for this run: opened when complete and current (a stale one is refused by name), else built. A
    resumed run opens its bank without the model check: the bank holds the stage-start target."""
    model = model_fingerprint(language_model, max(layers))
    data = data_fingerprint(rows)
    if not os.path.isfile(os.path.join(folder, META_FILE)):
        build_bank(folder, language_model, rows, layers, dtype=dtype, pad_token_id=pad_token_id, rank=rank,
                   world_size=world_size, batch_size=batch_size, model=model, data=data)
    return CaptionBank.open(folder, layers=layers, model=None if resuming else model, data=data)


def caption_rows(records, builder) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(id, caption ids, caption mask) of every record that enters the guide, in record order (no image is read)."""
    return [(record.id, *builder.caption_pass(record)) for record in records if builder.enters_guide(record)]
