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


def check_user_safetensors(path: str, what: str) -> None:
    """Refuse, naming the file, a file a user names as ``what`` (e.g. "LoRA files") unless it is an existing,
    intact ``.safetensors`` file: other formats would have to be unpickled, which can run code."""
    if not path.endswith(".safetensors"):
        raise KoalaError(
            f"{path}: koala reads {what} as .safetensors only (other formats, such as .bin / .ckpt / .pt, would "
            "have to be unpickled, which can run code); convert it to safetensors first"
        )
    if not os.path.isfile(path):
        raise KoalaError(f"{path}: no such file")
    check_safetensors(path)


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


ENTRY_BYTES = 320  # a stored tensor's own bytes beside its data: a torch.save zip entry (local header, central
# directory, 64-byte alignment, pickle record) or a safetensors header entry (measured on the tiny runs' checkpoints)


def _stored_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds; for a quantized tensor subclass (torchao: ``tensor_data_names``), those of its parts
    (int8 data and scales), not its logical dtype's."""
    names = [*getattr(t, "tensor_data_names", ()), *getattr(t, "optional_tensor_data_names", ())]
    if names:
        return sum(_stored_bytes(part) for part in (getattr(t, n, None) for n in names) if part is not None)
    return t.numel() * t.element_size()


def tensor_bytes(obj, per_tensor: int = 0) -> int:
    """The bytes of every tensor in a nested state (a tensor, dicts, lists, tuples, a module's state), as stored
    (a quantized tensor: its parts), plus ``per_tensor`` for each tensor (a file format's own bytes per entry:
    headers, names, alignment)."""
    if torch.is_tensor(obj):
        return _stored_bytes(obj) + per_tensor
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, per_tensor) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, per_tensor) for v in obj)
    if isinstance(obj, torch.nn.Module):
        return tensor_bytes(list(obj.state_dict().values()), per_tensor)
    return 0


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def save_tensor_file(obj, path: str) -> None:
    """``torch.save(obj)`` at ``path`` through a Python file object, so a failed write keeps its ``OSError``
    (errno ``ENOSPC`` / ``EDQUOT``) as the context of torch's ``RuntimeError`` (read by
    :func:`koala.utils.writes.write_failure`); flushed and synced, so a full disk shows here, not later."""
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def load_tensor_file(path: str, what: str | None = None):
    """The tensors and plain values (dicts, lists, numbers, strings) in a ``.pt`` file, read with
    ``torch.load(weights_only=True)``: the one way koala reads a torch file. A file that holds other objects (a
    pickle that would build classes or call functions) is refused by name; nothing in it runs. ``what``: how the
    message names the file (default: its path)."""
    import pickle

    name = what or path
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise KoalaError(f"{name}: file not found") from None
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower() or "weights_only" in str(err):
            raise KoalaError(
                f"{name} holds objects other than tensors and plain values; koala does not unpickle them"
            ) from None
        raise KoalaError(f"{name}: not a torch tensor file ({' '.join(str(err).split())[:200]})") from None
    except (RuntimeError, EOFError, ValueError, OSError) as err:
        raise KoalaError(
            f"{name}: cannot read it as a torch tensor file; it is truncated or corrupt "
            f"({' '.join(str(err).split())[:200]})"
        ) from None
