"""YAML recipes on top of a typed schema (OmegaConf structured configs), with ``key=value`` overrides.

``load(schema, recipe, overrides)`` returns schema defaults <- recipe (its ``extends:`` chain first) <-
overrides, as an OmegaConf ``DictConfig``. Unknown keys and wrong types are refused with a KoalaError naming
the file, the full dotted key and the closest known key. Overrides use OmegaConf's dotlist syntax (values
are YAML): ``train.lr=2e-5``, ``kd.features="{SA: all}"``, ``train.resume=null``.

A recipe is a YAML file path, or a bare name: ``./configs/NAME.yaml`` in the current directory if it exists,
else the recipe shipped in the package (``koala/configs/NAME.yaml``, see :func:`shipped_recipes`).
``extends: NAME_OR_PATH`` is resolved relative to the extending file first, then as a name.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from importlib.resources import files
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from .errors import KoalaError


def package_configs():
    return files("koala") / "configs"


def shipped_recipes() -> list[str]:
    """Names of the recipes shipped inside the package (``koala/configs/*.yaml``)."""
    return sorted(p.name[:-5] for p in package_configs().iterdir() if p.name.endswith(".yaml"))


def resolve_recipe(name: str):
    """A YAML file path, or a bare recipe name: ``./configs/NAME.yaml`` first, then the shipped one."""
    if os.path.isfile(name):
        return Path(name)
    if "/" not in name and os.sep not in name:
        stem = name[:-5] if name.endswith(".yaml") else name
        for cand in (Path.cwd() / "configs" / f"{stem}.yaml", package_configs() / f"{stem}.yaml"):
            if cand.is_file():
                return cand
    raise KoalaError(
        f"recipe {name!r} not found: give a YAML file path or a shipped recipe name: {', '.join(shipped_recipes())}"
    )


def _read(src) -> dict:
    try:
        data = OmegaConf.create(src.read_text())
    except OSError as err:
        raise KoalaError(f"{src}: cannot read ({err})") from err
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        why = " ".join(str(s) for s in (err.context, err.problem) if s)
        raise KoalaError(f"{src}: not valid YAML{at}: {why}") from err
    except (yaml.YAMLError, OmegaConfBaseException) as err:
        raise KoalaError(f"{src}: not a valid YAML mapping ({' '.join(str(err).split())})") from err
    if not isinstance(data, DictConfig):
        raise KoalaError(f"{src}: a recipe must be a YAML mapping (key: value lines), got a list")
    return OmegaConf.to_container(data, resolve=False)


def recipe_layers(name: str) -> list[tuple[str, dict]]:
    """``[(file, mapping), ...]`` from the root of the ``extends`` chain to ``name`` itself."""
    layers: list[tuple[str, dict]] = []
    src, seen = resolve_recipe(name), set()
    while True:
        real = os.path.realpath(src) if isinstance(src, Path) else str(src)
        if real in seen:
            raise KoalaError(f"{layers[0][0]}: 'extends' loops back to {src}")
        seen.add(real)
        data = _read(src)
        parent = data.pop("extends", None)
        layers.insert(0, (str(src), data))
        if parent is None:
            return layers
        if not isinstance(parent, str):
            raise KoalaError(f"{src}: 'extends' must be a recipe name or path, got {parent!r}")
        rel = src.parent.joinpath(parent)  # relative to the extending file first, then a name
        src = rel if rel.is_file() else resolve_recipe(parent)


def read_recipe(name: str) -> dict:
    """The recipe with its ``extends`` chain merged, without a schema (no defaults, no key checks)."""
    merged = OmegaConf.create()
    for where, data in recipe_layers(name):
        merged = _merge(merged, data, where)
    return OmegaConf.to_container(_resolved(merged, name), resolve=True)


def _has(data: Mapping, dotted: str) -> bool:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


INT_MAX = 2**63 - 1  # the largest whole number a setting may hold (torch's int64)


def _check_numbers(data, where: str, prefix: str = "") -> None:
    """Refuse a whole number no setting can hold (YAML reads ``1`` followed by 400 zeros as one), naming its key,
    before the schema tries to convert it (Python cannot make a float of it)."""
    items = data.items() if isinstance(data, Mapping) else enumerate(data) if isinstance(data, list) else ()
    for k, v in items:
        key = f"{prefix}[{k}]" if isinstance(data, list) else f"{prefix}{'.' if prefix else ''}{k}"
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) > INT_MAX:
            raise KoalaError(
                f"{where}: {key}: {str(v)[:20]}... ({len(str(v))} digits) is too large; the most a "
                f"setting holds is {INT_MAX}"
            )
        _check_numbers(v, where, key)


def _merge(cfg: DictConfig, layer, where: str) -> DictConfig:
    _check_numbers(layer, where)
    try:
        return OmegaConf.merge(cfg, layer)
    except ConfigKeyError as err:
        raise KoalaError(f"{where}: unknown key {err.full_key!r}{_suggest(cfg, err.full_key)}") from err
    except (OmegaConfBaseException, TypeError, ValueError) as err:  # TypeError: a list given a mapping
        if not getattr(err, "full_key", None):  # e.g. a section given a number: find the key the merge refused
            key = _culprit(cfg, layer)
            if key:
                raise KoalaError(f"{where}: {key}: {_message(err)}") from err
        raise KoalaError(f"{where}: {_message(err)}") from err


def _culprit(cfg: DictConfig, layer, prefix: str = "") -> str | None:
    """The dotted key of ``layer`` that a merge into ``cfg`` refuses (None when no single key does)."""
    if not isinstance(layer, Mapping):
        return None
    for k, v in layer.items():
        try:
            OmegaConf.merge(cfg, {k: v})
        except (OmegaConfBaseException, TypeError, ValueError):
            node = cfg.get(k) if isinstance(cfg, DictConfig) else None
            inner = _culprit(node, v, f"{prefix}{k}.") if isinstance(node, DictConfig) else None
            return inner or f"{prefix}{k}"
    return None


def _message(err: Exception) -> str:
    key = f"{err.full_key}: " if getattr(err, "full_key", None) else ""
    return key + str(getattr(err, "msg", None) or err).splitlines()[0]


def _resolved(cfg: DictConfig, where: str) -> DictConfig:
    """``cfg`` with its ``${...}`` interpolations resolved (a bad one is a KoalaError here, not later)."""
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as err:
        raise KoalaError(f"{where}: {_message(err)}") from err
    return cfg


def _suggest(cfg: DictConfig, full_key: str) -> str:
    parent, _, last = str(full_key).rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    known = [str(k) for k in node.keys()] if isinstance(node, DictConfig) else []
    close = difflib.get_close_matches(last, known, n=1)
    prefix = f"{parent}." if parent else ""
    return f" (did you mean {prefix}{close[0]}?)" if close else f" (known: {', '.join(known)})" if known else ""


def load(
    schema: type,
    recipe: str | None,
    overrides: Iterable[str] = (),
    *,
    whole: Iterable[str] = (),
    removed: Mapping[str, str] | None = None,
) -> DictConfig:
    """``schema`` defaults <- ``recipe`` (``extends`` chain first) <- ``key=value`` overrides.

    Keys in ``whole`` (dotted) are replaced as a whole by any layer that sets them, never merged key by key.
    ``removed`` maps a dotted key no longer accepted to the message telling what replaced it.
    """
    whole, removed = tuple(whole), dict(removed or {})
    cfg = OmegaConf.structured(schema)
    layers = [(where, data, None) for where, data in (recipe_layers(recipe) if recipe else [])]
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if "=" not in item or not key:
            raise KoalaError(f"override {item!r} must look like key=value (e.g. train.lr=2e-5)")
        try:
            layers.append((f"override {item!r}", OmegaConf.to_container(OmegaConf.from_dotlist([item])), key))
        except (yaml.YAMLError, OmegaConfBaseException) as err:
            raise KoalaError(f"override {item!r}: value is not valid YAML ({' '.join(str(err).split())})") from err
    for where, data, key in layers:
        for old, message in removed.items():
            if _has(data, old):
                raise KoalaError(f"{where}: {message}")
        for w in whole:  # a recipe setting it, or an override of it (or of a section holding it) replaces it
            if _has(data, w) if key is None else (w == key or w.startswith(key + ".")):
                OmegaConf.update(cfg, w, None, merge=False)
        cfg = _merge(cfg, data, where)
    return _resolved(cfg, recipe or "config")


def dump_recipe(cfg) -> str:
    """A resolved config (a typed dataclass config, a mapping or a ``DictConfig``) as YAML text
    (``koala distill --print-config``)."""
    if dataclasses.is_dataclass(cfg):
        cfg = dataclasses.asdict(cfg)
    elif isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None)
