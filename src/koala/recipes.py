"""YAML recipe configs with ``key=value`` command-line overrides.

A recipe is a nested mapping. ``load_recipe(path_or_name, overrides, defaults)`` returns
``defaults`` <- recipe (``extends: other`` first) <- overrides, and refuses keys the defaults do not know,
naming the key and the closest known one. Overrides use dotted keys and YAML values:
``train.lr=2e-5``, ``kd.features="{SA: all}"``, ``data.caption_dropout=0.1``, ``train.resume=null``.

A bare name (``tiny``) resolves to ``configs/tiny.yaml`` in the current directory or the repository.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
from pathlib import Path
from typing import Any, Iterable

import yaml

from .errors import KoalaError

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-5`` (no dot) as a float, as YAML 1.2 and every user expect."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def yaml_load(text):
    return yaml.load(text, Loader=_Loader)


def config_dirs() -> list[Path]:
    return [Path.cwd() / "configs", REPO_CONFIGS]


def resolve_recipe_path(name: str) -> str:
    """A path to a YAML file, or a bare recipe name looked up as ``configs/NAME.yaml``."""
    if os.path.isfile(name):
        return name
    if os.sep not in name and "/" not in name:
        stem = name[:-5] if name.endswith(".yaml") else name
        for d in config_dirs():
            cand = d / f"{stem}.yaml"
            if cand.is_file():
                return str(cand)
    known = sorted({p.stem for d in config_dirs() if d.is_dir() for p in d.glob("*.yaml")})
    raise KoalaError(f"recipe {name!r} not found: give a YAML file path or one of: {', '.join(known) or '(none found)'}")


def read_yaml(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = yaml_load(f)
    except OSError as err:
        raise KoalaError(f"{path}: cannot read ({err})") from err
    except yaml.YAMLError as err:
        raise KoalaError(f"{path}: not valid YAML ({err})") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise KoalaError(f"{path}: a recipe must be a YAML mapping, got {type(data).__name__}")
    return data


def parse_override(item: str) -> tuple[str, Any]:
    """``"a.b=value"`` -> ``("a.b", yaml-parsed value)``."""
    if "=" not in item:
        raise KoalaError(f"override {item!r} must look like key=value (e.g. train.lr=2e-5)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise KoalaError(f"override {item!r}: empty key")
    try:
        value = yaml_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise KoalaError(f"override {item!r}: value is not valid YAML ({err})") from err
    return key, value


def merge(base: dict, update: dict, atomic: Iterable[str] = (), _prefix: str = "") -> dict:
    """Deep-merge ``update`` into a copy of ``base``; dotted keys in ``atomic`` are replaced, not merged."""
    out = copy.deepcopy(base)
    for k, v in update.items():
        path = f"{_prefix}{k}"
        if isinstance(v, dict) and isinstance(out.get(k), dict) and path not in atomic:
            out[k] = merge(out[k], v, atomic, path + ".")
        else:
            out[k] = copy.deepcopy(v)
    return out


def set_dotted(cfg: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = cfg
    for i, p in enumerate(parts[:-1]):
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise KoalaError(f"override {key}: {'.'.join(parts[:i + 1])} is a {type(nxt).__name__}, not a section")
        node = nxt
    node[parts[-1]] = value


def get_dotted(cfg: dict, key: str, default: Any = None) -> Any:
    node: Any = cfg
    for p in key.split("."):
        if not isinstance(node, dict) or p not in node:
            return default
        node = node[p]
    return node


def check_keys(cfg: dict, schema: dict, where: str, open_sections: Iterable[str] = (), _prefix: str = "") -> None:
    """Refuse keys not in ``schema`` (sections listed in ``open_sections`` accept anything)."""
    for k, v in cfg.items():
        path = f"{_prefix}{k}"
        if path in open_sections:
            continue
        if k not in schema:
            close = difflib.get_close_matches(str(k), [str(s) for s in schema], n=1)
            hint = f" (did you mean {_prefix}{close[0]}?)" if close else f" (known: {', '.join(map(str, schema))})"
            raise KoalaError(f"{where}: unknown key {path!r}{hint}")
        if isinstance(schema[k], dict) and path not in open_sections:
            if not isinstance(v, dict):
                raise KoalaError(f"{where}: {path!r} must be a mapping, got {v!r}")
            check_keys(v, schema[k], where, open_sections, path + ".")


def load_recipe(name_or_path: str | None, overrides: Iterable[str] = (), defaults: dict | None = None,
                atomic: Iterable[str] = (), open_sections: Iterable[str] = ()) -> dict:
    """Resolve a recipe: defaults <- recipe (following ``extends``) <- ``key=value`` overrides.

    ``atomic`` sections are replaced as a whole by a recipe (not merged) and, like ``open_sections``,
    their keys are not checked against ``defaults`` (check them yourself).
    """
    atomic = tuple(atomic)
    cfg = copy.deepcopy(defaults or {})
    if name_or_path:
        cfg = merge(cfg, _read_with_extends(resolve_recipe_path(name_or_path), set(), atomic), atomic)
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(cfg, key, value)
    if defaults:
        check_keys(cfg, defaults, name_or_path or "config", (*open_sections, *atomic))
    return cfg


def _read_with_extends(path: str, seen: set[str], atomic: tuple = ()) -> dict:
    real = os.path.realpath(path)
    if real in seen:
        raise KoalaError(f"{path}: 'extends' loops back to itself")
    seen.add(real)
    data = read_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise KoalaError(f"{path}: 'extends' must be a recipe name or path, got {parent!r}")
    cand = os.path.join(os.path.dirname(path), parent)
    parent_path = cand if os.path.isfile(cand) else resolve_recipe_path(parent)
    return merge(_read_with_extends(parent_path, seen, atomic), data, atomic)


def dump_recipe(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None)
