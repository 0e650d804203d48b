"""The configuration reference in README.md, generated from the settings classes so it cannot drift.

Every option of clickpulse is a field of a pydantic-settings ``BaseSettings`` class listed in
:data:`SETTINGS_CLASSES` (the one place to add a new class; ``tests/unit/test_config_reference.py``
fails when a ``BaseSettings`` subclass in ``connectors/`` or ``jobs/`` is missing from it). For each
field the reference shows the environment variable it is read from, the command-line flag named in its
docstring, its type, its default and its description (``Field(description=...)`` or, as the classes
here do, the attribute docstring under the field). A subclass shows only the fields it declares itself
plus a note naming the documented classes it inherits the rest from.

Usage::

    python -m devstack.configdoc            # print the reference
    python -m devstack.configdoc --write    # rewrite the block in README.md
    python -m devstack.configdoc --check    # exit 1 when README.md is out of date

The block sits between :data:`START_MARKER` and :data:`END_MARKER`. Importing the job modules loads
PyFlink's Python modules but starts no JVM (that happens only when a job builds its environment).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import enum
import importlib
import inspect
import logging
import pkgutil
import re
import sys
import textwrap
import types
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import annotated_types
from pydantic import AliasChoices, AliasPath, SecretStr
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

from connectors.settings import RENAMED

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
README = REPO_ROOT / "README.md"
START_MARKER = "<!-- config-reference:start -->"
END_MARKER = "<!-- config-reference:end -->"

#: Every settings class, ``module:Class``, in the order the reference shows them.
SETTINGS_CLASSES: tuple[str, ...] = (
    "connectors.settings:Connections",
    "connectors.settings:ConsumerSettings",
    "connectors.flink:FlinkSettings",
    "jobs.ingest:IngestSettings",
    "jobs.sessionize:SessionizeSettings",
    "jobs.triggers:TriggersSettings",
    "connectors.dispatch:DispatchSettings",
    "jobs.load:LoadSettings",
    "connectors.dashboard.settings:DashboardSettings",
    "connectors.collector.settings:CollectorSettings",
    "devstack.stack:StackSettings",
    "devstack.chserver:ChServerSettings",
)
#: Each job's settings (a frozen dataclass of areas), ``module:Class``, in the order the reference shows.
JOB_SETTINGS: tuple[str, ...] = (
    "jobs.pipeline:PipelineJobSettings",
    "jobs.ingest:IngestJobSettings",
    "jobs.sessionize:SessionizeJobSettings",
    "jobs.triggers:TriggersJobSettings",
    "jobs.dispatch:DispatchJobSettings",
    "jobs.load:LoadJobSettings",
)
#: Packages searched by :func:`discover_settings_classes`.
SCANNED_PACKAGES: tuple[str, ...] = ("connectors", "jobs", "devstack")

#: Fields whose name (or variable) contains one of these hold a secret: their default is not shown.
SECRET_WORDS: tuple[str, ...] = ("SECRET", "PASSWORD", "TOKEN")
#: ...unless the name ends like this: the field then names *another* variable (``webhook_secret_env``).
SECRET_POINTER_SUFFIX = "_ENV"  # noqa: S105 - a name suffix, not a password
HIDDEN = "*(hidden)*"

# ``CLICKPULSE_X`` / ``--flag`` / ``--other``: text   (the convention of the field docstrings here)
_LEAD = re.compile(r"^``(?P<env>[A-Za-z0-9_]+)``(?P<flags>(?:\s*/\s*``--[a-z0-9-]+``)*)\s*:\s*", re.DOTALL)
_FLAG = re.compile(r"``(--[a-z0-9-]+)``")
_ROLE = re.compile(r":[a-z]+:`~?([^`]+)`")
_STATED_DEFAULT = re.compile(r"\s*\(default:?\s+(?P<value>[^()]*?)(?P<close>\))\.?$")


@dataclass(frozen=True)
class Setting:
    """One documented option: a field of a settings class."""

    field: str
    env_var: str
    flags: tuple[str, ...]
    type: str
    default: str
    description: str
    declared_env_var: str  # the variable the docstring names ("" when it names none)


@dataclass(frozen=True)
class SettingsDoc:
    """The documented part of one settings class."""

    cls: type[BaseSettings]
    summary: str
    inherits: tuple[type[BaseSettings], ...]  # documented base classes, nearest first
    settings: tuple[Setting, ...]

    @property
    def name(self) -> str:
        """The class name."""
        return self.cls.__name__

    @property
    def source(self) -> str:
        """Repository-relative file of the class, e.g. ``jobs/load.py``."""
        return self.cls.__module__.replace(".", "/") + ".py"


# ----------------------------------------------------------------------------------------- classes


def load_class(spec: str) -> type[BaseSettings]:
    """Import ``module:Class`` and check it is a ``BaseSettings`` subclass."""
    module_name, _, name = spec.partition(":")
    obj = getattr(importlib.import_module(module_name), name)
    if not (isinstance(obj, type) and issubclass(obj, BaseSettings)):
        raise TypeError(f"{spec} is not a pydantic-settings BaseSettings subclass")
    return obj


def settings_classes(specs: Sequence[str] = SETTINGS_CLASSES) -> list[type[BaseSettings]]:
    """The listed settings classes, imported, in reference order."""
    return [load_class(spec) for spec in specs]


def discover_settings_classes(packages: Sequence[str] = SCANNED_PACKAGES) -> list[type[BaseSettings]]:
    """Every ``BaseSettings`` subclass defined in a module of ``packages`` (imports each module)."""
    found: dict[str, type[BaseSettings]] = {}
    for package_name in packages:
        package = importlib.import_module(package_name)
        names = [package_name]
        names += [m.name for m in pkgutil.walk_packages(package.__path__, package_name + ".")]
        for module_name in names:
            module = importlib.import_module(module_name)
            for obj in vars(module).values():
                if (
                    isinstance(obj, type)
                    and issubclass(obj, BaseSettings)
                    and obj.model_fields  # not a base class such as connectors.settings.Settings
                    and obj.__module__ == module_name
                ):
                    found[f"{module_name}:{obj.__qualname__}"] = obj
    return [found[key] for key in sorted(found)]


# ------------------------------------------------------------------------------------------ fields


def own_field_names(cls: type[BaseSettings]) -> list[str]:
    """Fields declared in the body of ``cls`` itself (not inherited), in declaration order."""
    declared = vars(cls).get("__annotations__", {})
    return [name for name in declared if name in cls.model_fields]


def attribute_docstrings(cls: type) -> dict[str, str]:
    """``{field: docstring}`` for the string literals directly under annotated assignments in ``cls``."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    node = ast.parse(source).body[0]
    if not isinstance(node, ast.ClassDef):
        return {}
    docs: dict[str, str] = {}
    body = node.body
    for stmt, nxt in zip(body, body[1:], strict=False):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[stmt.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def env_var(cls: type[BaseSettings], name: str) -> str:
    """The environment variable that sets field ``name`` of ``cls``, as documented (upper case).

    A ``validation_alias`` (which ``alias=`` also sets) wins, its first choice for ``AliasChoices``;
    otherwise it is ``env_prefix`` + the field name (pydantic-settings matches case-insensitively
    unless ``case_sensitive`` is set, so the upper-case spelling is the one to document).
    """
    info = cls.model_fields[name]
    alias = info.validation_alias
    config = cls.model_config
    prefix = str(config.get("env_prefix") or "")
    alias_prefix = prefix if config.get("env_prefix_target") in ("alias", "all") else ""
    chosen: str | None = None
    if isinstance(alias, AliasChoices):
        first = alias.choices[0]
        chosen = first if isinstance(first, str) else str(first.path[0])
    elif isinstance(alias, AliasPath):
        chosen = str(alias.path[0])
    elif isinstance(alias, str):
        chosen = alias
    if chosen is not None:
        result = alias_prefix + chosen
    else:
        result = prefix + name
    return result if config.get("case_sensitive") else result.upper()


def is_secret(name: str, env: str) -> bool:
    """Whether a field holds a secret (its default must not be shown)."""
    for text in (name.upper(), env.upper()):
        if text.endswith(SECRET_POINTER_SUFFIX):
            continue
        if any(word in text for word in SECRET_WORDS):
            return True
    return False


def _type_name(annotation: Any) -> str:
    if annotation is type(None):
        return "none"
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        text = " or ".join(_type_name(a) for a in args)
        return f"{text}, optional" if len(args) < len(get_args(annotation)) else text
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return " / ".join(f"`{member.value}`" for member in annotation)
    if annotation is SecretStr:
        return "str (secret)"
    if isinstance(annotation, type) and issubclass(annotation, Path):
        return "path"
    return getattr(annotation, "__name__", str(annotation))


def type_text(info: FieldInfo) -> str:
    """Human type of a field, with numeric bounds (``int > 0``)."""
    text = _type_name(info.annotation)
    for meta in info.metadata:
        if isinstance(meta, annotated_types.Gt):
            text += f" > {meta.gt}"
        elif isinstance(meta, annotated_types.Ge):
            text += f" ≥ {meta.ge}"
        elif isinstance(meta, annotated_types.Lt):
            text += f" < {meta.lt}"
        elif isinstance(meta, annotated_types.Le):
            text += f" ≤ {meta.le}"
    return text


def default_value(info: FieldInfo) -> Any:
    """The declared default of a field, secrets unwrapped, enums as their values."""
    value = info.get_default(call_default_factory=True, validated_data={})
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if isinstance(value, enum.Enum):
        value = value.value
    return value


def default_text(info: FieldInfo, secret: bool) -> str:
    """The default as one would write it in the environment (``*(hidden)*`` for secrets)."""
    if secret:
        return HIDDEN
    value = default_value(info)
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    text = str(value)
    return f"`{text}`" if text else "empty"


def states_default(stated: str, value: Any) -> bool:
    """Whether ``stated`` (the text of a docstring's "(default X)") says the same as ``value``."""
    stated = stated.strip().strip("`").strip()
    if value is None or value == "":
        return stated in ("none", "empty", "unset")
    if isinstance(value, bool):
        return stated in (("true", "on") if value else ("false", "off"))
    if isinstance(value, int | float):
        try:
            return float(stated.replace("_", "")) == float(value)
        except ValueError:
            return False
    return stated == str(value)


def _drop_stated_default(text: str, value: Any) -> str:
    """``text`` without a trailing "(default X)" that only repeats the default column."""
    found = _STATED_DEFAULT.search(text)
    if found and states_default(found.group("value"), value):
        return text[: found.start()] + text[found.end("close") :]
    return text


def _markdown(text: str) -> str:
    """reST-ish docstring text as one line of Markdown (double backticks, roles)."""
    text = _ROLE.sub(r"``\1``", text)
    text = text.replace("``", "`")
    return " ".join(text.split())


def describe_field(cls: type[BaseSettings], name: str, docstrings: dict[str, str] | None = None) -> Setting:
    """The :class:`Setting` of field ``name`` of ``cls``."""
    info = cls.model_fields[name]
    if docstrings is None:
        docstrings = attribute_docstrings(cls)
    raw = info.description or docstrings.get(name, "")
    declared, flags = "", ()
    lead = _LEAD.match(raw)
    if lead:
        declared = lead.group("env")
        flags = tuple(_FLAG.findall(lead.group("flags")))
        raw = raw[lead.end() :]
    env = env_var(cls, name)
    return Setting(
        field=name,
        env_var=env,
        flags=flags,
        type=type_text(info),
        default=default_text(info, is_secret(name, env)),
        description=_drop_stated_default(_markdown(raw), default_value(info)),
        declared_env_var=declared,
    )


def describe_class(cls: type[BaseSettings], documented: Iterable[type[BaseSettings]] = ()) -> SettingsDoc:
    """The documented part of ``cls``: its own fields and the documented classes it inherits from."""
    docs = attribute_docstrings(cls)
    documented = tuple(documented)
    inherits = tuple(base for base in cls.__mro__[1:] if base in documented)
    summary = _markdown(inspect.cleandoc(cls.__doc__ or ""))
    return SettingsDoc(
        cls=cls,
        summary=summary,
        inherits=inherits,
        settings=tuple(describe_field(cls, name, docs) for name in own_field_names(cls)),
    )


def reference(specs: Sequence[str] = SETTINGS_CLASSES) -> list[SettingsDoc]:
    """Every listed settings class, described."""
    classes = settings_classes(specs)
    return [describe_class(cls, classes) for cls in classes]


# ------------------------------------------------------------------------------------------ output


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def job_areas(specs: Sequence[str] = JOB_SETTINGS) -> list[tuple[str, list[type[BaseSettings]]]]:
    """``(job, [area classes])`` for each job's settings dataclass."""
    out = []
    for spec in specs:
        module_name, _, name = spec.partition(":")
        kind = getattr(importlib.import_module(module_name), name)
        hints = get_type_hints(kind)
        out.append((module_name.rsplit(".", 1)[-1], [hints[f.name] for f in dataclasses.fields(kind)]))
    return out


def render_markdown(specs: Sequence[str] = SETTINGS_CLASSES) -> str:
    """The configuration reference as Markdown (the README block without its markers)."""
    lines = [
        "<!-- generated by `python -m devstack.configdoc --write` from the settings classes; "
        "do not edit by hand -->",
        "",
        "Precedence: command-line flag, then environment variable, then `.clickpulse/stack.env` "
        "(written by `clickpulse stack up`), then the default. Names are matched case-insensitively. "
        "Names follow `CLICKPULSE_<AREA>_<NAME>`; durations are whole milliseconds (`_MS`). "
        "Each job reads the areas below:",
        "",
        "| job | settings areas |",
        "|---|---|",
    ]
    for job, areas in job_areas():
        lines.append(f"| `{job}` | {', '.join(f'`{a.__name__}`' for a in areas)} |")
    for doc in reference(specs):
        lines += ["", f"### `{doc.name}` — `{doc.source}`", ""]
        if doc.summary:
            lines += [doc.summary, ""]
        if doc.inherits:
            names = " and ".join(f"`{base.__name__}`" for base in doc.inherits)
            lines += [f"Also: the {names} options.", ""]
        lines += ["| variable | flag | type | default | meaning |", "|---|---|---|---|---|"]
        for s in doc.settings:
            flags = ", ".join(f"`{flag}`" for flag in s.flags)
            lines.append(
                f"| `{s.env_var}` | {_cell(flags)} | {_cell(s.type)} | {_cell(s.default)} "
                f"| {_cell(s.description)} |"
            )
    lines += [
        "",
        "### Renamed variables",
        "",
        "These old names still work: each logs a deprecation warning once and sets the new variable "
        "(unless that is set too). Old names in seconds are converted to milliseconds.",
        "",
        "| old name | new name |",
        "|---|---|",
    ]
    for r in RENAMED:
        unit = " (seconds → milliseconds)" if r.scale != 1 else ""
        lines.append(f"| `{r.old}` | `{r.new}`{unit} |")
    return "\n".join(lines) + "\n"


def replace_block(text: str, block: str) -> str:
    """``text`` with the content between the markers replaced by ``block``."""
    start = text.find(START_MARKER)
    end = text.find(END_MARKER)
    if start < 0 or end < start:
        raise ValueError(f"README has no {START_MARKER} ... {END_MARKER} block")
    head = text[: start + len(START_MARKER)]
    return f"{head}\n{block.rstrip(chr(10))}\n{text[end:]}"


def readme_block(text: str) -> str:
    """The content between the markers of ``text`` (as :func:`render_markdown` returns it)."""
    start = text.find(START_MARKER)
    end = text.find(END_MARKER)
    if start < 0 or end < start:
        raise ValueError(f"README has no {START_MARKER} ... {END_MARKER} block")
    return text[start + len(START_MARKER) : end].strip("\n") + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: print the reference, ``--write`` it into README.md or ``--check`` README.md is current."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = argparse.ArgumentParser(prog="devstack.configdoc", description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="rewrite the block in the README")
    mode.add_argument("--check", action="store_true", help="exit 1 when the README block is out of date")
    p.add_argument("--readme", type=Path, default=README, help="the README to update (default: the repo's)")
    args = p.parse_args(argv)
    block = render_markdown()
    if not (args.write or args.check):
        sys.stdout.write(block)
        return 0
    text = args.readme.read_text(encoding="utf-8")
    try:
        current = readme_block(text)
    except ValueError as exc:
        log.error("%s: %s", args.readme, exc)
        return 2
    if args.check:
        if current != block:
            log.error(
                "%s: configuration reference is out of date; run python -m devstack.configdoc --write",
                args.readme,
            )
            return 1
        return 0
    if current != block:
        args.readme.write_text(replace_block(text, block), encoding="utf-8")
        log.info("%s: configuration reference updated", args.readme)
    return 0


if __name__ == "__main__":
    sys.exit(main())
