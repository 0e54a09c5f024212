"""Parameters declared once: a config dataclass field carries its command-line form.

A field made with :func:`param` holds its default, its help text, the function that parses its
command-line string, its choices and how its default is written. An entry point (:class:`Entry`)
builds its parser from the dataclass (``Entry.parser``) and turns the parsed values back into it
(``Entry.build``); MLproject's parameter blocks are rendered from the same declarations
(:func:`mlproject`), and a test fails when the file is out of date. Adding a hyperparameter is
one field.

Nested configs (a train's ``DataConfig`` and ``HParams``) are flattened: their fields become
parameters of the entry point, and a name declared at two levels (``seed``) is one parameter
that sets both. This module imports nothing of the product, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

_PARAM = "cars_ml.param"
_NESTED = "cars_ml.nested"
_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}
_OFF = {"none", "off", "inf", ""}


# --- Parsers: a command-line string in, a typed value out, or a message that names the fix.


def str2bool(value: str) -> bool:
    """Parse true/false/1/0/yes/no (any case)."""
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def comma_list(value: str) -> tuple[str, ...]:
    """``a,b , c`` -> ``("a", "b", "c")``; empty items are dropped."""
    return tuple(item.strip() for item in str(value).split(",") if item.strip())


def integer(value: str) -> int:
    """An integer; ``5.0`` is accepted because MLproject ``float`` params may arrive that way."""
    number = float(value)
    if not number.is_integer():
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}")
    return int(number)


def non_negative_int(value: str) -> int:
    number = integer(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return number


def positive_int(value: str) -> int:
    number = integer(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return number


def positive_float(value: str) -> float:
    number = float(value)
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {value}")
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return number


def non_negative_float(value: str) -> float:
    number = float(value)
    if not (math.isfinite(number) and number >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {value}")
    return number


def fraction(value: str) -> float:
    number = float(value)
    if not 0.0 <= number <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return number


def budget(value: str) -> float | None:
    """A budget >= 0, or none/off to switch the budget off."""
    if str(value).strip().lower() in _OFF:
        return None
    number = float(value)
    if not number >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (or none), got {value}")
    return number


def auto_or(parse: Callable[[str], Any], auto: Any) -> Callable[[str], Any]:
    """``parse``, with the word ``auto`` standing for ``auto``."""

    def parse_or_auto(value: str) -> Any:
        return auto if str(value).strip().lower() == "auto" else parse(value)

    parse_or_auto.__name__ = getattr(parse, "__name__", "value")
    return parse_or_auto


_NUMERIC = {
    integer,
    non_negative_int,
    positive_int,
    positive_float,
    non_negative_float,
    fraction,
    float,
}


# --- Declarations.


@dataclass(frozen=True)
class Param:
    help: str
    parse: Callable[[str], Any]
    choices: tuple[str, ...] | None
    text: str | None  # the default as a user writes it (``auto``, ``none``); None: str(default)
    name: str | None  # the command-line name when it is not the field's


def param(
    default: Any,
    help: str = "",
    *,
    parse: Callable[[str], Any] | None = None,
    choices: Sequence[str] | None = None,
    text: str | None = None,
    name: str | None = None,
) -> Any:
    """A dataclass field that is also a command-line and MLproject parameter.

    ``parse`` turns the command-line string into the value (default: by the default's type);
    ``text`` is how the default is written on the command line when ``str(default)`` is not it.
    """
    if parse is None:
        parse = {bool: str2bool, int: integer, float: float}.get(type(default), str)
    spec = Param(help, parse, tuple(choices) if choices else None, text, name)
    return field(default=default, metadata={_PARAM: spec})


def nested(cls: type, *, only: Sequence[str] | None = None) -> Any:
    """A nested config whose parameters (``only`` these, at any depth) join the outer ones."""
    return field(default_factory=cls, metadata={_NESTED: (cls, tuple(only) if only else None)})


@dataclass(frozen=True)
class Leaf:
    """One parameter of an entry point: where it lives and how it is declared."""

    name: str  # on the command line and in MLproject
    path: tuple[str, ...]  # field names from the top config down
    default: Any
    spec: Param

    @property
    def default_text(self) -> str:
        if self.spec.text is not None:
            return self.spec.text
        if isinstance(self.default, bool):
            return str(self.default).lower()
        if isinstance(self.default, tuple):
            return ",".join(map(str, self.default))
        return "" if self.default is None else str(self.default)


def leaves(cls: type, *, exclude: Sequence[str] = (), rename: dict[str, str] | None = None):
    """The parameters of ``cls`` in declaration order, nested configs flattened.

    A name met again at a deeper level is the same parameter (it sets both fields); its
    declarations must agree on the default.
    """
    found: dict[str, Leaf] = {}
    shared: dict[str, list[Leaf]] = {}
    for leaf in _walk(cls, (), None):
        name = (rename or {}).get(leaf.name, leaf.name)
        if name in exclude:
            continue
        leaf = dataclasses.replace(leaf, name=name)
        if name in found:
            if found[name].default != leaf.default:
                raise ValueError(
                    f"{cls.__name__}: parameter {name} has two defaults, "
                    f"{found[name].default!r} and {leaf.default!r}; declare one."
                )
            shared.setdefault(name, []).append(leaf)
            continue
        found[name] = leaf
    return list(found.values()), shared


def _walk(cls: type, path: tuple[str, ...], only: tuple[str, ...] | None) -> Iterator[Leaf]:
    for f in dataclasses.fields(cls):
        if _NESTED in f.metadata:
            inner, inner_only = f.metadata[_NESTED]
            yield from _walk(inner, (*path, f.name), only or inner_only)
        elif _PARAM in f.metadata:
            spec = f.metadata[_PARAM]
            name = spec.name or f.name
            if only is None or name in only:
                yield Leaf(name, (*path, f.name), f.default, spec)


@dataclass(frozen=True)
class Entry:
    """An MLproject entry point: its script, its config and which parameters it exposes."""

    name: str
    config: type
    description: str
    exclude: tuple[str, ...] = ()
    rename: dict[str, str] = field(default_factory=dict)  # field name -> parameter name

    @property
    def script(self) -> str:
        return f"entrypoints/{self.name}.py"

    def leaves(self) -> list[Leaf]:
        return leaves(self.config, exclude=self.exclude, rename=self.rename)[0]

    def parser(self, parser_class: type = argparse.ArgumentParser) -> argparse.ArgumentParser:
        """An argparse parser with one option per parameter, defaults shown in ``--help``."""
        p = parser_class(
            description=self.description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
        )
        add_arguments(p, self.leaves())
        return p

    def build(self, namespace: argparse.Namespace) -> Any:
        """The config of parsed values; fields that are no parameter keep their defaults."""
        all_leaves, shared = leaves(self.config, exclude=self.exclude, rename=self.rename)
        values = vars(namespace)
        by_path = {leaf.path: values[leaf.name] for leaf in all_leaves}
        for name, extra in shared.items():
            by_path.update({leaf.path: values[name] for leaf in extra})
        return _construct(self.config, (), by_path)

    def mlproject(self) -> str:
        """This entry point's block of the MLproject file."""
        lines = [f"  {self.name}:", "    parameters:"]
        for leaf in self.leaves():
            kind = "float" if _numeric(leaf) else "string"
            lines.append(f"      {leaf.name}: {{type: {kind}, default: {_yaml(leaf)}}}")
        args = " ".join(f"--{leaf.name} {{{leaf.name}}}" for leaf in self.leaves())
        lines += ["    command: >-", *_wrap(f"python {self.script} {args}", "      ")]
        return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser, params: Sequence[Leaf]) -> None:
    for leaf in params:
        spec = leaf.spec
        p.add_argument(
            f"--{leaf.name}",
            type=_keeping_the_message(spec.parse),
            default=leaf.default if spec.text is None else spec.parse(spec.text),
            choices=spec.choices,
            help=spec.help or None,
        )


def _keeping_the_message(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    # argparse shows "invalid <name> value" for a ValueError; the parser's own message says more.
    def convert(value: str) -> Any:
        try:
            return parse(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def _construct(cls: type, path: tuple[str, ...], values: dict) -> Any:
    kwargs = {}
    for f in dataclasses.fields(cls):
        here = (*path, f.name)
        if _NESTED in f.metadata:
            kwargs[f.name] = _construct(f.metadata[_NESTED][0], here, values)
        elif here in values:
            kwargs[f.name] = values[here]
    return cls(**kwargs)


def _numeric(leaf: Leaf) -> bool:
    # MLflow checks a ``float`` parameter before the entry point runs; a parameter that also
    # takes words (auto, none) is a string.
    return leaf.spec.parse in _NUMERIC and leaf.spec.text is None


def _yaml(leaf: Leaf) -> str:
    text = leaf.default_text
    if _numeric(leaf):
        return text
    plain = text.replace("_", "").replace("-", "").replace(".", "").isalnum()
    if plain and text.lower() not in _TRUE | _FALSE | {"null", "none", "~"}:
        return text
    return f'"{text}"'


def _wrap(text: str, indent: str, width: int = 100) -> list[str]:
    lines, line = [], ""
    for word in _command_words(text):
        if line and len(indent) + len(line) + 1 + len(word) > width:
            lines.append(indent + line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return [*lines, indent + line]


def _command_words(text: str) -> list[str]:
    # "--name {name}" stays on one line.
    words, parts = [], text.split(" ")
    i = 0
    while i < len(parts):
        if parts[i].startswith("--") and i + 1 < len(parts):
            words.append(f"{parts[i]} {parts[i + 1]}")
            i += 2
        else:
            words.append(parts[i])
            i += 1
    return words


def mlproject(entries: Sequence[Entry]) -> str:
    """The whole MLproject file."""
    head = [
        "# Generated from the config dataclasses (cars_ml/params.py) by",
        "# `python entrypoints/_common.py`: edit the dataclasses, not this file.",
        "# Run with `mlflow run . -e <entry> -P key=value --env-manager local`.",
        "name: cars-ml",
        "",
        "conda_env: conda.yaml",
        "",
        "entry_points:",
    ]
    return "\n".join(head) + "\n" + "\n\n".join(e.mlproject() for e in entries) + "\n"
