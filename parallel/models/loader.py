"""Load a local Hugging Face folder: config.json, safetensors weights (single or sharded with an index)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from parallel.distributed import TPGroup
from parallel.models.llama import LlamaArgs, LlamaForCausalLM

INDEX_FILE = "model.safetensors.index.json"


def read_json(folder: str | Path, name: str, required: bool = True) -> dict[str, Any]:
    path = Path(folder) / name
    if not path.is_file():
        if required:
            raise FileNotFoundError(f"{name} not found in model folder {str(folder)!r}")
        return {}
    return json.loads(path.read_text())


def check_model_folder(folder: str | Path) -> Path:
    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {str(folder)!r} does not exist (a local Hugging Face folder is expected)")
    return path


def weight_files(folder: str | Path) -> list[Path]:
    """The checkpoint's safetensors files: those the index names, else every *.safetensors in the folder."""
    path = check_model_folder(folder)
    index = path / INDEX_FILE
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{INDEX_FILE} names shards missing from {str(folder)!r}: {', '.join(missing)}")
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {str(folder)!r} (.bin checkpoints are not supported)")
    return files


def iter_safetensors(folder: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    for file in weight_files(folder):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield name, f.get_tensor(name)


def load_model(folder: str | Path, dtype: torch.dtype, device: torch.device,
               tp: TPGroup | None = None) -> LlamaForCausalLM:
    """Build the model named by config.json and load its weights, on ``device`` in ``dtype``.

    Example:
        >>> model = load_model("models/tiny-code-llama", torch.float32, torch.device("cpu"))
    """
    args = LlamaArgs.from_hf(read_json(check_model_folder(folder), "config.json"))
    model = LlamaForCausalLM(args, tp or TPGroup.single()).to(dtype=dtype, device=device)
    model.load_weights(iter_safetensors(folder))
    return model.eval()


def checkpoint_dtype(folder: str | Path) -> str:
    cfg = read_json(folder, "config.json")
    return str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32")
