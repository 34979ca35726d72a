"""Weights: safetensors headers and integrity checks, meta-device buffers, parameter counts."""

from __future__ import annotations

import json
import os

import torch

from ..errors import KoalaError


def safetensors_header(path: str) -> dict:
    """The JSON header of a safetensors file (tensor name -> dtype, shape, offsets; ``__metadata__``)."""
    import struct

    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def check_safetensors(path: str) -> None:
    """Refuse a truncated or corrupt ``.safetensors`` file before any library loads it, naming the file.

    Reads only the header: an 8-byte little-endian length, a JSON table of tensors and their byte ranges; the file
    must be exactly as long as the header says."""
    import struct

    def bad(why: str) -> KoalaError:
        return KoalaError(
            f"{path}: not a valid safetensors file ({why}); the file is truncated or corrupt: "
            "download or copy it again"
        )

    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise bad(f"{size} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100_000_000:
                raise bad(f"header length {n} exceeds the file size {size}")
            header = json.loads(f.read(n))
    except OSError as err:
        raise KoalaError(f"{path}: cannot read ({err.strerror or err})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise bad(f"header is not JSON: {err}") from None
    if not isinstance(header, dict):
        raise bad("header is not a table of tensors")
    end = max(
        (
            int(v["data_offsets"][1])
            for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v
        ),
        default=0,
    )
    if 8 + n + end != size:
        raise bad(f"the header describes {8 + n + end} bytes but the file has {size}")


def check_weights(folder: str) -> None:
    """:func:`check_safetensors` for every ``*.safetensors`` directly in ``folder`` (a model component dir)."""
    if os.path.isdir(folder):
        for name in sorted(os.listdir(folder)):
            if name.endswith(".safetensors"):
                check_safetensors(os.path.join(folder, name))


def materialize_meta_buffers(module: torch.nn.Module) -> torch.nn.Module:
    """Give the buffers a ``load_state_dict(assign=True)`` onto a meta-built module left on meta (non-persistent ones:
    position ids) real values: ``arange`` for ``*position_ids``, zeros otherwise."""
    for name, buf in list(module.named_buffers()):
        if not buf.is_meta:
            continue
        owner = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
        leaf = name.rsplit(".", 1)[-1]
        value = (
            torch.arange(buf.shape[-1]).expand(buf.shape).clone()
            if leaf.endswith("position_ids")
            else torch.zeros(buf.shape, dtype=buf.dtype)
        )
        owner.register_buffer(leaf, value, persistent=leaf not in owner._non_persistent_buffers_set)
    return module


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds; for a quantized tensor subclass (torchao: ``tensor_data_names``), those of its parts
    (int8 data and scales), not its logical dtype's."""
    names = [*getattr(t, "tensor_data_names", ()), *getattr(t, "optional_tensor_data_names", ())]
    if names:
        return sum(tensor_bytes(part) for part in (getattr(t, n, None) for n in names) if part is not None)
    return t.numel() * t.element_size()


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
