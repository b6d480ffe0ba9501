"""Build a ``Config`` from defaults, YAML, a DeepSpeed JSON and command-line overrides.

Precedence is defaults < YAML < DeepSpeed JSON < command line; when a later source changes a
value an earlier one set explicitly, one line says so on stderr, because silently losing a value
the user wrote is the classic way to burn a cluster run. Everything here is plain Python (no
torch) so the CLI rejects bad input before the slow imports.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import json
import os
import sys
import typing
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import yaml

from .deepspeed import map_deepspeed
from .schema import Config
from .validate import ConfigError, fmt, validate

__all__ = ["ConfigError", "field_docs", "config_from_dict", "config_to_dict", "save_yaml",
           "parse_args", "parse_or_exit", "help_text", "SECTIONS"]

SECTIONS: Dict[str, type] = {f.name: typing.get_type_hints(Config)[f.name]
                             for f in dataclasses.fields(Config)}
"""Section name -> section dataclass, in schema order."""

_TRUE = {"true", "1", "yes", "on", "y"}
_FALSE = {"false", "0", "no", "off", "n"}


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> Dict[str, str]:
    """Field -> docstring (the string literal right under it), whitespace collapsed.

    Read from source with ``ast`` so the schema file stays the single place options are described.
    """
    tree = ast.parse(inspect.cleandoc("\n" + inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: Dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


@functools.lru_cache(maxsize=None)
def _field_types(cls: type) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    """Human name of a field type for help and error lines."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Literal:
        return " or ".join(str(a) for a in args)
    if typing.get_origin(tp) is typing.Union:
        return " or ".join(_type_name(a) if a is not type(None) else "none" for a in args)
    if typing.get_origin(tp) in (list, List):
        return f"list of {_type_name(args[0])}"
    return getattr(tp, "__name__", str(tp))


class _BadType(Exception):
    """Internal: the value cannot be converted to the field's type."""


def _coerce(value: Any, tp: Any) -> Any:
    """Convert a YAML/JSON/CLI value to ``tp``; strings are accepted for every type."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:  # a keyword such as parallel.dp's `auto`
        if isinstance(value, str) and value.strip().lower() in args:
            return value.strip().lower()
        raise _BadType
    if origin is typing.Union:
        if type(None) in args and (value is None
                                   or str(value).strip().lower() in ("none", "null", "")):
            return None
        for inner in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, inner)
            except _BadType:
                pass
        raise _BadType
    if origin in (list, List):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",")] if value.strip() else []
        if not isinstance(value, (list, tuple)):
            raise _BadType
        return [_coerce(v, args[0]) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise _BadType
    if tp is str and isinstance(value, bool):  # YAML's false in an auto|true|false field
        return "true" if value else "false"
    if isinstance(value, bool) or value is None or isinstance(value, (list, dict)):
        raise _BadType
    if tp is int:
        if isinstance(value, int):
            return value
        try:
            return int(str(value).strip())
        except ValueError:
            pass
        try:
            as_float = float(value)  # accepts 1e6 for step counts
        except ValueError:
            raise _BadType from None
        if as_float.is_integer():
            return int(as_float)
        raise _BadType
    if tp is float:
        try:
            return float(value)
        except ValueError:
            raise _BadType from None
    if tp is str:
        return str(value)
    raise _BadType


def _suggest(name: str, options: List[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f"; did you mean {close[0]}?" if close else f"; valid: {', '.join(options)}"


def _flatten(d: Any, origin: str, errors: List[str]) -> Dict[str, Any]:
    """Nested ``{section: {field: raw}}`` -> ``{"section.field": coerced}``; bad names/types are
    appended to ``errors`` (named with ``origin`` so the user knows which file to fix)."""
    flat: Dict[str, Any] = {}
    if d is None:
        return flat
    if not isinstance(d, dict):
        errors.append(f"{origin}: expected a mapping of sections, got {type(d).__name__}")
        return flat
    for section, fields in d.items():
        if section not in SECTIONS:
            _set_one(flat, str(section), None, origin, errors)  # reports the unknown section
        elif fields is not None and not isinstance(fields, dict):
            errors.append(f"{origin}: section '{section}' must be a mapping of fields")
        else:
            for name, raw in (fields or {}).items():
                _set_one(flat, f"{section}.{name}", raw, origin, errors)
    return flat


def _set_one(flat: Dict[str, Any], dotted: str, raw: Any, origin: str, errors: List[str]) -> None:
    """Coerce one ``section.field`` value into ``flat``; report unknown names and bad types."""
    section, _, name = dotted.partition(".")
    if section not in SECTIONS:
        errors.append(f"{origin}: unknown section '{section}'{_suggest(section, list(SECTIONS))}")
        return
    types = _field_types(SECTIONS[section])
    if name not in types:
        options = [f"{section}.{f}" for f in types]
        errors.append(f"{origin}: unknown field '{dotted}'{_suggest(dotted, options)}")
        return
    try:
        flat[dotted] = _coerce(raw, types[name])
    except _BadType:
        errors.append(f"{origin}: {dotted}={fmt(raw)}: expected {_type_name(types[name])}")


def _build(flat: Dict[str, Any]) -> Config:
    cfg = Config()
    for dotted, value in flat.items():
        section, name = dotted.split(".")
        setattr(getattr(cfg, section), name, value)
    return cfg


def config_from_dict(d: Dict[str, Any]) -> Config:
    """Nested dict (as in YAML) -> Config with coerced types; not validated (see ``validate``)."""
    errors: List[str] = []
    flat = _flatten(d, "config", errors)
    if errors:
        raise ConfigError(errors)
    return _build(flat)


def config_to_dict(cfg: Config) -> Dict[str, Any]:
    """Plain nested dict, the inverse of ``config_from_dict``."""
    return dataclasses.asdict(cfg)


def save_yaml(cfg: Config, path: str | Path) -> None:
    """Write the resolved config, so a run directory records exactly what ran."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def _read_file(path: str, kind: str) -> Any:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError([f"--{kind} {path}: cannot read ({exc.strerror or exc})"]) from None
    try:
        return yaml.safe_load(text) if kind == "config" else json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        detail = " ".join(str(exc).split())
        raise ConfigError([f"--{kind} {path}: not valid {'YAML' if kind == 'config' else 'JSON'}"
                           f" ({detail})"]) from None


def _split_argv(argv: List[str]) -> Tuple[Dict[str, str], List[Tuple[str, Any]]]:
    """Separate file flags from ``section.field`` overrides; unknown flags raise."""
    files: Dict[str, str] = {}
    overrides: List[Tuple[str, Any]] = []
    errors: List[str] = []
    flags = ["config", "deepspeed_config", "local_rank"]
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith("--"):
            errors.append(f"unexpected argument '{arg}'; options look like --section.field=value")
            continue
        name, eq, value = arg[2:].partition("=")
        name = name.replace("-", "_")
        if not eq:
            if i < len(argv) and not argv[i].startswith("--"):
                value, i = argv[i], i + 1
            elif "." in name and _is_bool_field(name):
                value = "true"  # bare boolean flag
            else:
                errors.append(f"--{name} needs a value")
                continue
        if name in ("config", "deepspeed_config"):
            if name in files:
                errors.append(f"--{name} given twice")
            files[name] = value
        elif name == "local_rank":
            pass  # appended by the deepspeed launcher; LOCAL_RANK comes from the environment
        elif "." in name:
            overrides.append((name, value))
        else:
            errors.append(f"unknown option '--{name}'{_suggest(name, flags)}")
    if errors:
        raise ConfigError(errors)
    return files, overrides


def _is_bool_field(dotted: str) -> bool:
    section, _, name = dotted.partition(".")
    return _field_types(SECTIONS[section]).get(name) is bool if section in SECTIONS else False


def parse_args(argv: List[str], verbose: bool = True,
               world_size: Optional[int] = None) -> Tuple[Config, List[str]]:
    """Defaults < ``--config`` YAML < ``--deepspeed_config`` JSON < ``--section.field`` overrides.

    ``world_size`` is the launcher's process count (None: a bare run), from which
    ``parallel.dp=auto`` is resolved before the batch sizes (see ``validate``).

    With ``verbose``, prints one ``config: ... overridden by ...`` line to stderr per value the
    DeepSpeed JSON changes or the command line changes in it (a command-line override of the
    YAML is the normal way to extend a config and stays silent); returns the
    validated config plus warning lines. Raises ConfigError listing every problem found.
    """
    files, overrides = _split_argv(argv)
    errors: List[str] = []
    warnings: List[str] = []
    sources: List[Tuple[str, Dict[str, Any]]] = []
    if "config" in files:
        sources.append(("yaml", _flatten(_read_file(files["config"], "config"),
                                         files["config"], errors)))
    cli: Dict[str, Any] = {}
    for dotted, raw in overrides:
        _set_one(cli, dotted, raw, "command line", errors)
    if "deepspeed_config" in files:
        # WarmupCosineLR's min_lr is a ratio of the lr megalite would otherwise use.
        lr = cli.get("train.lr", sources[0][1].get("train.lr") if sources else None)
        try:
            ds_over, ds_warn = map_deepspeed(_read_file(files["deepspeed_config"],
                                                        "deepspeed_config"),
                                             lr=Config().train.lr if lr is None else lr)
        except ConfigError as exc:
            errors.extend(exc.lines)
        else:
            warnings.extend(ds_warn)
            sources.append(("deepspeed config", _flatten(ds_over, "deepspeed config", errors)))
    sources.append(("command line", cli))
    if errors:
        raise ConfigError(errors)
    merged: Dict[str, Tuple[Any, str]] = {}
    for origin, flat in sources:
        for key, value in flat.items():
            if (verbose and key in merged and merged[key][0] != value
                    and (merged[key][1], origin) != ("yaml", "command line")):
                old, old_origin = merged[key]
                print(f"config: {key}: {fmt(old)} ({old_origin}) overridden by {fmt(value)} "
                      f"({origin})", file=sys.stderr)
            merged[key] = (value, origin)
    cfg = validate(_build({k: v for k, (v, _) in merged.items()}), world_size)
    return cfg, warnings


def parse_or_exit(argv: List[str], world_size: Optional[int] = None,
                  node_speaker: Optional[bool] = None) -> Tuple[Config, List[str]]:
    """``parse_args`` for CLI entry points: print ``error: `` lines and exit 2 on bad input.

    Launched ranks all parse the same command line: warnings come from rank 0 only, errors
    from one rank per node (``node_speaker``, default: local rank 0), since a missing file may
    be missing on one node only."""
    # other launched ranks would repeat every line, and so would the ranks of a bare run whose
    # parent printed them (megalite.launcher.local.launch_local sets MEGALITE_CONFIG_SHOWN)
    speaker = (os.environ.get("RANK", "0") == "0"
               and os.environ.get("MEGALITE_CONFIG_SHOWN") != "1")
    if node_speaker is None:
        node_speaker = os.environ.get("LOCAL_RANK", "0") == "0"
    try:
        cfg, warnings = parse_args(argv, verbose=speaker, world_size=world_size)
    except ConfigError as exc:
        for line in exc.lines if node_speaker else []:
            print(f"error: {line}", file=sys.stderr)
        sys.exit(2)
    for line in warnings if speaker else []:
        print(f"warning: {line}", file=sys.stderr)
    return cfg, warnings


def help_text() -> str:
    """Every option with type, default and docstring, grouped by section (for ``--help``)."""
    out = ["Configuration (precedence: defaults < --config FILE.yaml < --deepspeed_config "
           "FILE.json < --section.field=VALUE):", ""]
    defaults = Config()
    for section, cls in SECTIONS.items():
        out.append(f"{section}:")
        docs, types = field_docs(cls), _field_types(cls)
        for f in dataclasses.fields(cls):
            default = getattr(getattr(defaults, section), f.name)
            out.append(f"  --{section}.{f.name} ({_type_name(types[f.name])}, default "
                       f"{fmt(default)}): {docs.get(f.name, '')}")
        out.append("")
    return "\n".join(out)

