"""Small shared helpers: dtypes, JSON reading, atomic output directories, parameter counts."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import tempfile
from typing import Iterator

import torch

from .errors import KoalaError

DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise KoalaError(f"unknown dtype {name!r}; choose one of fp32, fp16, bf16") from None


def read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise KoalaError(f"{path}: file not found") from None
    except json.JSONDecodeError as err:
        raise KoalaError(f"{path}: not valid JSON ({err})") from err


@contextlib.contextmanager
def atomic_output_dir(out_dir: str, overwrite: bool = False) -> Iterator[str]:
    """Yield a temporary directory beside ``out_dir``; on success it replaces ``out_dir``, on error it is removed.

    Nothing half-written is ever left at ``out_dir``.
    """
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise KoalaError(f"{out_dir} already exists; overwrite it or choose another output directory", option="overwrite")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(out_dir):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
        os.rename(out_dir, os.path.join(old, "x"))
        os.rename(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out_dir)


@contextlib.contextmanager
def atomic_file(path: str, suffix: str = "") -> Iterator[str]:
    """Yield a temporary file name beside ``path``; on success it replaces ``path``, on error it is removed.
    Nothing half-written is ever left at ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path: str, text: str) -> str:
    """Write ``text`` to ``path`` through a temporary file in the same folder: never a half-written file."""
    with atomic_file(path) as tmp, open(tmp, "w") as f:
        f.write(text)
    return path


def existing_parent(path: str) -> str:
    """``path`` itself if it exists, else its nearest existing ancestor."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def check_output_folder(out: str, what: str = "the output", option: str | None = "out") -> None:
    """Before any work: ``out`` is a folder or can be created as one, in a writable place."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise KoalaError(f"{out} exists and is a file; {what} needs a folder", option=option)
    parent = existing_parent(out)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise KoalaError(f"{out}: cannot write there ({parent} is not a writable folder)", option=option)


PREEMPTED_EXIT = 3  # exit status of a command stopped by SIGTERM / SIGUSR1 / Ctrl-C after saving its state


class StopRequest:
    """``with StopRequest() as stop: ... if stop.requested: save and leave``.

    SIGTERM and SIGUSR1 (what cluster schedulers send before killing a job) and the first Ctrl-C set
    ``requested`` (the signal's name) instead of killing the process, so a loop can finish its unit of work and
    save; a second Ctrl-C raises KeyboardInterrupt at once. Outside the main thread (where handlers cannot be
    installed) it does nothing. The previous handlers are restored on exit."""

    SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")

    def __init__(self):
        self.requested: str | None = None
        self._previous: dict = {}

    def _handle(self, signum, _frame):
        import signal

        name = signal.Signals(signum).name
        if self.requested and name == "SIGINT":
            raise KeyboardInterrupt
        if not self.requested:
            self.requested = name
            print(f"\nkoala: {name} received: finishing the current step, then saving and stopping "
                  "(Ctrl-C again to stop at once)", flush=True)

    def __enter__(self) -> "StopRequest":
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> bool:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        return False


def read_jsonl(path: str) -> list[dict]:
    """The JSON-object lines of ``path`` ([] when it does not exist); a line cut by a kill is skipped."""
    rows = []
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict):
                    rows.append(row)
    return rows


def materialize_meta_buffers(module: torch.nn.Module) -> torch.nn.Module:
    """Give the buffers a ``load_state_dict(assign=True)`` onto a meta-built module left on meta (non-persistent ones:
    position ids) real values: ``arange`` for ``*position_ids``, zeros otherwise."""
    for name, buf in list(module.named_buffers()):
        if not buf.is_meta:
            continue
        owner = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
        leaf = name.rsplit(".", 1)[-1]
        value = (torch.arange(buf.shape[-1]).expand(buf.shape).clone() if leaf.endswith("position_ids")
                 else torch.zeros(buf.shape, dtype=buf.dtype))
        owner.register_buffer(leaf, value, persistent=leaf not in owner._non_persistent_buffers_set)
    return module


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
        return KoalaError(f"{path}: not a valid safetensors file ({why}); the file is truncated or corrupt: "
                          "download or copy it again")

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
    end = max((int(v["data_offsets"][1]) for k, v in header.items()
               if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v), default=0)
    if 8 + n + end != size:
        raise bad(f"the header describes {8 + n + end} bytes but the file has {size}")


def check_weights(folder: str) -> None:
    """:func:`check_safetensors` for every ``*.safetensors`` directly in ``folder`` (a model component dir)."""
    if os.path.isdir(folder):
        for name in sorted(os.listdir(folder)):
            if name.endswith(".safetensors"):
                check_safetensors(os.path.join(folder, name))


DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


def parse_device(name: str | None, option: str = "device") -> torch.device:
    """A checked ``torch.device``: a known type that this machine has (cuda:N within the visible count)."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in DEVICE_TYPES:
        raise KoalaError(f"device {name!r}: unknown; use cpu, cuda, cuda:N or mps", option=option)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise KoalaError(f"device {name}: no CUDA device is visible to PyTorch; use the cpu device", option=option)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise KoalaError(f"device {name}: only {torch.cuda.device_count()} CUDA device(s) visible", option=option)
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise KoalaError(f"device {name}: MPS is not available on this machine; use the cpu device", option=option)
    if dev.type == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise KoalaError(f"device {name}: no XPU device is visible to PyTorch; use the cpu device", option=option)
    return dev


def check_dtype_on_device(dtype: torch.dtype, device: torch.device | str, option: str = "dtype") -> None:
    """Refuse a dtype the device cannot compute in (bf16 on a CUDA GPU before Ampere)."""
    device = torch.device(device)
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise KoalaError(f"dtype bf16: {torch.cuda.get_device_name(device)} has no bf16 support; use fp16",
                         option=option)


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def tree_to(tree, device=None, dtype: torch.dtype | None = None):
    """``tree`` (a tensor or nested dict of tensors) moved to ``device``; floating tensors cast to ``dtype``."""
    if isinstance(tree, dict):
        return {k: tree_to(v, device, dtype) for k, v in tree.items()}
    return tree.to(device=device, dtype=dtype if dtype is not None and torch.is_floating_point(tree) else None)


def require(module: str, extra: str, what: str):
    """``import module``, or a KoalaError naming the optional extra that provides it (``koala-diffusion[extra]``)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise KoalaError(f"{what} needs the {module.split('.')[0]} package: pip install 'koala-diffusion[{extra}]'") \
            from None


COMPILE_SCOPES = ("full", "blocks")
# the repeated blocks of diffusers' U-Nets and DiTs: regional compilation compiles each once per input shape
REPEATED_BLOCKS = ("BasicTransformerBlock", "ResnetBlock2D")


def _has_hooks(m: torch.nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks)


def _compile_region(m: torch.nn.Module, kw: dict) -> int:
    """Compile the largest sub-trees of ``m`` that hold no hooked module; a hooked module whose children hold none
    gets its ``forward`` compiled, so its hooks run eagerly around the compiled code."""
    if not any(_has_hooks(x) for x in m.modules()):
        m.compile(**kw)
        return 1
    if not any(_has_hooks(x) for x in list(m.modules())[1:]):
        m.forward = torch.compile(m.forward, **kw)
        return 1
    return sum(_compile_region(c, kw) for c in m.children())


def compile_module(module: torch.nn.Module, scope: str = "full", backend: str = "inductor",
                   mode: str | None = None) -> int:
    """``torch.compile`` a model in place (its hooks, parameter names and ``state_dict`` keys stay).

    ``scope="full"``: one graph for the whole forward, forward hooks registered before this call traced into it
    (fastest code, longest compilation).
    ``scope="blocks"``: regional compilation: each repeated block (``REPEATED_BLOCKS``) is compiled in place; blocks
    of the same class share the generated code where their input shapes agree, so compilation takes a fraction of
    the full graph's time (what diffusers' ``compile_repeated_blocks`` does for models that declare their blocks).
    A block that holds hooked modules (featKD hooks on ``attn1``, say) is compiled in its hook-free parts instead,
    with the hooks outside the compiled code: blocks that share code must not share traced hooks (dynamo does not
    guard on hooks by default, so a graph traced with one block's hook would run for another's).
    Returns the number of compiled regions."""
    if scope not in COMPILE_SCOPES:
        raise KoalaError(f"compile scope {scope!r}: choose one of {', '.join(COMPILE_SCOPES)}", option="compile_scope")
    kw = {"backend": backend, **({"mode": mode} if mode else {})}
    if scope == "full":
        module.compile(**kw)
        return 1
    blocks = [m for m in module.modules() if type(m).__name__ in REPEATED_BLOCKS]
    if not blocks:
        raise KoalaError(f"compile scope blocks: {type(module).__name__} has none of {', '.join(REPEATED_BLOCKS)}; "
                         "use the full scope", option="compile_scope")
    # one static graph per (block shape, grad mode, dtype): a U-Net's resnets alone come in more than dynamo's
    # default 8 variants (after which it falls back to eager), and automatic dynamic shapes would make slower kernels
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return sum(_compile_region(m, {**kw, "dynamic": False}) for m in blocks)


def attention_context(backend: str):
    """``train.attention``: a context forcing one SDPA backend (diffusers' attention calls
    ``F.scaled_dot_product_attention``), or nothing for ``auto``."""
    if backend == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel({"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                        "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[backend])
