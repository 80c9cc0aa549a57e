"""The config schema: every option declared once, with its type, default, help and bounds.

A :class:`Section` holds :class:`Option` declarations (and nested sections, such as
``p2p.connections``). Everything the config loader checks follows from them — types (an integer
is not a number is not a boolean), finite numbers of at most 64 bits, ranges, choices, the items of
a list, unknown keys — and so does what ``kairos config defaults`` prints. Readers get a frozen
settings object (:meth:`Section.read`) whose attributes have the declared types, so no reader
casts again.

The core declares its sections in :mod:`kairos_core.config`; a plugin declares its own through the
``kairos_config_schema`` hook::

    VPN = Section(
        "vpn",
        Option("mtu", int, 1420, "MTU of the TUN device.", minimum=576, maximum=9000),
        help="The VPN.", aliases=("p2p.vpn",),
    )

Problems read ``<path>: <what is wrong>`` (``vpn.mtu: must be between 576 and 9000, not 100``).

Kairos cloud-configs name many options differently (``p2p.loglevel`` for ``node.log_level``,
EdgeVPN's ``p2p.vpn.env.ADDRESS`` for ``vpn.address``): an option lists those places in ``paths``
(:class:`Alias`, a dotted path from the top of the file), and the loader moves what is written
there to the option before checking it, so problems still name the path the user wrote. A Kairos
key that can do nothing here is declared with ``no_effect`` (accepted, one warning saying why).
"""

from __future__ import annotations

import copy
import dataclasses
import keyword
import math
import re
import textwrap
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

from .errors import ConfigError

# Numbers must fit where they go: int64 fields, timers, ports. Anything larger is a typo.
MAX_CONFIG_INT = 2**63 - 1
#: Help of an option declared without any (a plain ``kairos_config_defaults`` dict).
NO_HELP = "(no help)"

#: What an :class:`Alias`'s ``parse`` returns when the value sets nothing (EdgeVPN's ``DHCP: "false"``).
SKIP = object()


@dataclasses.dataclass(frozen=True)
class Alias:
    """Another place where users may set an option or a whole section (Kairos's name for it).

    :param path: dotted, from the top of the file (``p2p.loglevel``, ``p2p.vpn.env.ADDRESS``).
    :param parse: turns the value written there into the option's (EdgeVPN's variables are
        strings: ``"200"``, ``"false"``); may return :data:`SKIP`, or raise ``ValueError``.
    :param warning: said once when the path is used (a place Kairos itself ignores, say).
    """

    path: str
    parse: Callable[[Any], Any] | None = None
    warning: str | None = None


def _as_alias(path: str | Alias) -> Alias:
    return path if isinstance(path, Alias) else Alias(str(path))


def text_value(value: Any) -> Any:
    """A string read the way YAML reads a scalar (``"200"`` → 200, ``"false"`` → False), for
    options Kairos users set through string-only maps such as ``p2p.vpn.env``."""
    import yaml

    if not isinstance(value, str):
        return value
    try:
        parsed = yaml.safe_load(value)
    except (yaml.YAMLError, RecursionError, ValueError):
        return value
    return parsed if isinstance(parsed, (bool, int, float, str)) else value


def text_list(value: Any) -> Any:
    """A comma-separated string as a list of its non-empty items (EdgeVPN's list variables)."""
    if not isinstance(value, str):
        return value
    return [item.strip() for item in value.split(",") if item.strip()]


# ``object`` as an option's type accepts any value: what a legacy default of another type allowed.
_TYPES = (bool, int, float, str, list, dict, object)
_TYPE_NAMES = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "mapping"}


def type_name(value: Any, article: bool = False) -> str:
    """How a problem names the type of ``value`` (``an integer``, ``a mapping``, ``null``)."""
    if value is None:
        return "null"
    name = _TYPE_NAMES.get(type(value), type(value).__name__)
    if not article:
        return name
    return ("an " if name[0] in "aeiou" else "a ") + name


def _kind(of_type: type | None, article: bool = True) -> str:
    name = _TYPE_NAMES.get(of_type, "single value") if of_type is not None else "single value"
    if not article:
        return name
    return ("an " if name[0] in "aeiou" else "a ") + name


@dataclasses.dataclass(frozen=True)
class Option:
    """One option of a section.

    :param name: its key in the section.
    :param type: ``bool``, ``int``, ``float`` (an integer is accepted and stored as a float),
        ``str``, ``list``, ``dict`` (a free-form mapping), ``object`` (anything), or ``None`` (any
        single value: no list, no mapping). A ``None`` default makes the option optional: it may
        be ``None`` too.
    :param default: the value when the config gives none (``key:`` with nothing after it as well).
    :param help: what it does, for ``kairos config defaults`` — required: every option has help.
    :param minimum: the lowest value of a number (inclusive).
    :param maximum: the highest value of a number (inclusive).
    :param choices: the only values allowed (``node.log_level``).
    :param item_type: the type of every item of a list (``str``, ``int``, ``float``, ``bool``).
    :param aliases: other keys of the same section that set this option (Kairos's names).
    :param paths: other places in the file that set it (:class:`Alias` or a dotted path, e.g.
        ``"p2p.loglevel"``): read as if written here. The option's own key wins unless it holds the
        default (Kairos cannot tell ``false`` from unset), then the first place given; the others
        are ignored with a warning.
    :param no_effect: why this option, accepted for Kairos's sake, does nothing here: setting it
        to anything but its default gives one warning saying so. Another section's option may claim its path (``paths``),
        and then the value goes there and nothing is said (``p2p.dns`` for a DNS plugin).
    :param finite: refuse NaN and infinities (numbers; the default).
    """

    name: str
    type: type | None
    default: Any
    help: str
    minimum: int | float | None = dataclasses.field(default=None, kw_only=True)
    maximum: int | float | None = dataclasses.field(default=None, kw_only=True)
    choices: tuple[Any, ...] | None = dataclasses.field(default=None, kw_only=True)
    item_type: type | None = dataclasses.field(default=None, kw_only=True)
    aliases: tuple[str, ...] = dataclasses.field(default=(), kw_only=True)
    paths: tuple[str | Alias, ...] = dataclasses.field(default=(), kw_only=True)
    no_effect: str | None = dataclasses.field(default=None, kw_only=True)
    finite: bool = dataclasses.field(default=True, kw_only=True)

    def __post_init__(self) -> None:
        # A declaration mistake should fail where it is made, not in a user's config check.
        if self.type is not None and self.type not in _TYPES:
            raise TypeError(f"option {self.name}: type must be one of bool, int, float, str, list, dict, object or None")
        if self.choices is not None:
            object.__setattr__(self, "choices", tuple(self.choices))
        object.__setattr__(self, "aliases", tuple(self.aliases))
        object.__setattr__(self, "paths", tuple(_as_alias(path) for path in self.paths))
        problem = self.problem(self.default, self.name)[1]
        if problem:
            raise ValueError(f"option {self.name}: its default is invalid: {problem}")

    @property
    def optional(self) -> bool:
        """Whether ``None`` is a value of this option (its default is ``None``)."""
        return self.default is None

    def problem(self, value: Any, path: str) -> tuple[Any, str | None]:
        """``(value as stored, None)``, or ``(None, "<path>: <problem>")`` when ``value`` does not fit."""
        if value is None:
            if self.optional or self.type is object:
                return None, None
            return None, f"{path}: expected {_kind(self.type)}, got null"
        kind = self.type
        if kind is None:
            if isinstance(value, (dict, list)):
                return None, f"{path}: expected a single value, got {type_name(value, article=True)}"
            return value, self._choice_problem(value, path)
        if kind is object:
            return copy.deepcopy(value), None
        fits = {
            bool: lambda v: isinstance(v, bool),
            int: lambda v: isinstance(v, int) and not isinstance(v, bool),
            float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
            str: lambda v: isinstance(v, str),
            list: lambda v: isinstance(v, list),
            dict: lambda v: isinstance(v, dict),
        }[kind]
        if not fits(value):
            return None, f"{path}: expected {_kind(kind)}, got {type_name(value, article=True)}"
        if kind in (int, float):
            problem = _number_problem(kind, value, self.finite)
            if problem:
                return None, f"{path}: {problem}"
            value = float(value) if kind is float else value
            return value, self._range_problem(value, path) or self._choice_problem(value, path)
        if kind is list:
            return copy.deepcopy(value), self._item_problem(value, path)
        if kind is dict:
            return copy.deepcopy(value), None
        return value, self._choice_problem(value, path)

    def _range_problem(self, value: int | float, path: str) -> str | None:
        low, high = self.minimum, self.maximum
        if (low is None or value >= low) and (high is None or value <= high):
            return None
        if low is not None and high is not None:
            return f"{path}: must be between {low} and {high}, not {value}"
        if low is not None:
            return f"{path}: must be at least {low}, not {value}"
        return f"{path}: must be at most {high}, not {value}"

    def _choice_problem(self, value: Any, path: str) -> str | None:
        if self.choices is None or value in self.choices:
            return None
        return f"{path}: {value!r} is not one of {', '.join(_show_choice(c) for c in self.choices)}"

    def _item_problem(self, value: list[Any], path: str) -> str | None:
        # The first item that is not of the declared type (one line per list is enough to fix it).
        if self.item_type is None:
            return None
        item = Option(f"{self.name}[]", self.item_type, self.item_type(), NO_HELP)
        for index, element in enumerate(value):
            problem = item.problem(element, f"{path}[{index}]")[1]
            if problem:
                return problem
        return None

    def describe(self) -> dict[str, Any]:
        """The declaration as JSON data (``kairos config defaults --json``)."""
        data: dict[str, Any] = {
            "name": self.name,
            "type": _schema_type_name(self.type),
            "default": self.default,
            "help": self.help,
        }
        for key in ("minimum", "maximum", "choices"):
            value = getattr(self, key)
            if value is not None:
                data[key] = list(value) if isinstance(value, tuple) else value
        if self.item_type is not None:
            data["item_type"] = _schema_type_name(self.item_type)
        if self.aliases:
            data["aliases"] = list(self.aliases)
        if self.paths:
            data["kairos_paths"] = [_as_alias(path).path for path in self.paths]
        if self.no_effect:
            data["no_effect"] = self.no_effect
        if not self.finite:
            data["finite"] = False
        return data


def _show_choice(choice: Any) -> str:
    return '""' if choice == "" else str(choice)


def _schema_type_name(of_type: type | None) -> str:
    if of_type is None:
        return "scalar"
    return {object: "any"}.get(of_type, _TYPE_NAMES.get(of_type, str(of_type)))


def _number_problem(kind: type, value: int | float, finite: bool) -> str | None:
    # NaN passes every range check (each comparison is false) and infinity every lower bound;
    # integers beyond 64 bits overflow float() or the int64 fields they end up in.
    if isinstance(value, float):
        return None if math.isfinite(value) or not finite else f"expected a finite number, got {value}"
    if abs(value) <= MAX_CONFIG_INT:
        return None
    if kind is float:
        return f"expected a number of at most 64 bits, got an integer of {value.bit_length()} bits"
    return f"expected an integer of at most 64 bits, got one of {value.bit_length()} bits"


class Section:
    """A config section: its options (and nested sections) in the order they are shown.

    :param name: the section's key (top level, or inside its parent section).
    :param options: :class:`Option` and nested :class:`Section` declarations.
    :param help: what the section is for.
    :param aliases: dotted paths from the top of the file where Kairos users may write the whole
        section instead (``"p2p.vpn"``; an :class:`Alias` to warn when it is used): read as if
        written here, this section winning key by key. Nested sections may have them too.
    :param unknown: ``"error"`` (an unknown key is a problem) or ``"warn"`` (it is ignored with a
        warning: a map of another program's settings, such as EdgeVPN's ``p2p.vpn.env``).
    :param unknown_note: what the warning for an unknown key says (``unknown EdgeVPN variable``).
    """

    def __init__(
        self,
        name: str,
        *options: Option | Section,
        help: str = "",
        aliases: Iterable[str | Alias] = (),
        unknown: str = "error",
        unknown_note: str = "unknown key",
    ) -> None:
        if unknown not in ("error", "warn"):
            raise ValueError(f"section {name}: unknown must be 'error' or 'warn'")
        self.name = name
        self.options: tuple[Option | Section, ...] = tuple(options)
        self.help = help
        declared = tuple(_as_alias(alias) for alias in aliases)
        self.aliases = tuple(alias.path for alias in declared)
        #: the warning each alias path gives when used, if any
        self.alias_warnings = {alias.path: alias.warning for alias in declared if alias.warning}
        self.unknown = unknown
        self.unknown_note = unknown_note
        self._by_key: dict[str, Option | Section] = {}
        for option in self.options:
            if not isinstance(option, (Option, Section)):
                raise TypeError(f"section {name}: {option!r} is neither an Option nor a Section")
            for key in (option.name, *(option.aliases if isinstance(option, Option) else ())):
                if key in self._by_key:
                    raise ValueError(f"section {name}: {key!r} is declared twice")
                self._by_key[key] = option
        self._settings_class: type | None = None

    def __repr__(self) -> str:
        return f"Section({self.name!r}, {len(self.options)} options)"

    def __iter__(self):
        return iter(self.options)

    def get(self, key: str) -> Option | Section | None:
        """The option (or nested section) ``key`` names, aliases included; None when unknown."""
        return self._by_key.get(key)

    def defaults(self) -> dict[str, Any]:
        """Every option's default (a fresh copy), nested sections as mappings."""
        return {
            option.name: option.defaults() if isinstance(option, Section) else copy.deepcopy(option.default)
            for option in self.options
        }

    def merge(
        self, given: Any, path: str, problems: list[str], strict: bool = False, warnings: list[str] | None = None
    ) -> dict[str, Any]:
        """``given`` over the defaults, every problem appended to ``problems`` with its path.

        A key given as ``None`` keeps its default (``key:`` with nothing after it), unless
        ``strict``: then ``None`` is a value, valid only for optional options. What is accepted
        but ignored (unknown keys of a ``"warn"`` section, ``no_effect`` options) is appended to
        ``warnings``.
        """
        warnings = [] if warnings is None else warnings
        merged = self.defaults()
        if given is None:
            return merged
        if not isinstance(given, Mapping):
            problems.append(f"{path}: expected a mapping, got {type_name(given)}")
            return merged
        seen: dict[str, str] = {}
        for key, value in given.items():
            key_path = f"{path}.{key}"
            option = self._by_key.get(key)
            if option is None:
                if self.unknown == "warn":
                    warnings.append(f"{key_path}: {self.unknown_note}, ignored")
                else:
                    problems.append(f"{key_path}: unknown key")
                continue
            if option.name in seen:
                problems.append(f"{key_path}: sets the same option as {path}.{seen[option.name]}; give one of them")
                continue
            seen[option.name] = key
            if isinstance(option, Section):
                merged[option.name] = option.merge(value, key_path, problems, strict, warnings)
                continue
            if value is None and not strict:
                continue
            stored, problem = option.problem(value, key_path)
            if problem:
                problems.append(problem)
            else:
                merged[option.name] = stored
                if option.no_effect and stored != option.default:
                    warnings.append(f"{key_path}: accepted, but has no effect here: {option.no_effect}")
        return merged

    def validate(self, values: Any, path: str | None = None) -> dict[str, Any]:
        """``values`` checked strictly and completed with defaults; :class:`ConfigError` lists the problems."""
        problems: list[str] = []
        merged = self.merge(thawed(values), path or self.name, problems, strict=True)
        if problems:
            noun = "problem" if len(problems) == 1 else "problems"
            raise ConfigError(f"config: {len(problems)} {noun}: " + "; ".join(problems), problems)
        return merged

    def read(self, values: Any) -> Any:
        """The typed, frozen settings of ``values`` (a section as ``node.config[name]`` holds it).

        Each option is an attribute of its declared type (lists become tuples, nested sections
        settings of their own). Raises :class:`ConfigError` for values the schema refuses, so a
        config built by hand is checked too.
        """
        return self._build(self.validate(values))

    @property
    def settings_class(self) -> type:
        """The frozen dataclass :meth:`read` returns (one per section)."""
        if self._settings_class is None:
            fields = [(attribute_name(option.name), _annotation(option)) for option in self.options]
            camel = "".join(part.capitalize() for part in re.split(r"\W|_", self.name) if part)
            self._settings_class = dataclasses.make_dataclass(f"{camel or 'Section'}Settings", fields, frozen=True)
            self._settings_class.__doc__ = self.help or f"The settings of section {self.name}."
        return self._settings_class

    def _build(self, merged: Mapping[str, Any]) -> Any:
        values = {}
        for option in self.options:
            value = merged[option.name]
            if isinstance(option, Section):
                value = option._build(value)
            elif isinstance(value, list):
                value = tuple(value)
            values[attribute_name(option.name)] = value
        return self.settings_class(**values)

    def describe(self) -> dict[str, Any]:
        """The section as JSON data: name, help, aliases and every option's declaration."""
        data: dict[str, Any] = {"name": self.name, "type": "section", "help": self.help}
        if self.aliases:
            data["aliases"] = list(self.aliases)
        if self.unknown != "error":
            data["unknown"] = self.unknown
        data["options"] = [option.describe() for option in self.options]
        return data


def frozen(value: Any) -> Any:
    """A deeply read-only copy of config data: mappings become read-only mappings
    (:class:`types.MappingProxyType`) and lists tuples, all the way down; scalars stay as they are.
    What ``node.config`` holds, so that no plugin can change the node's config by accident."""
    if isinstance(value, Mapping):
        return MappingProxyType({key: frozen(item) for key, item in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(frozen(item) for item in value)
    return value


def thawed(value: Any) -> Any:
    """Plain ``dict``/``list`` data again from what :func:`frozen` made (anything else as given),
    so that a section of ``node.config`` validates as the data it was built from."""
    if not isinstance(value, MappingProxyType):
        return value

    def plain(item: Any) -> Any:
        if isinstance(item, Mapping):
            return {key: plain(inner) for key, inner in item.items()}
        if isinstance(item, tuple):
            return [plain(inner) for inner in item]
        return item

    return plain(value)


def attribute_name(key: str) -> str:
    """The settings attribute of option ``key``: ``-`` and other non-word characters become ``_``."""
    name = re.sub(r"\W", "_", key)
    if not name or name[0].isdigit() or keyword.iskeyword(name):
        name = f"_{name}" if not keyword.iskeyword(name) else f"{name}_"
    return name


def _annotation(option: Option | Section) -> Any:
    if isinstance(option, Section):
        return Any
    kind = {list: tuple, None: Any, object: Any}.get(option.type, option.type)
    return kind | None if option.optional and kind is not Any else kind


def section_from_defaults(name: str, defaults: Mapping[str, Any]) -> Section:
    """A section declared the old way, a mapping of defaults (``kairos_config_defaults``).

    Each default's type is the option's type: a non-empty mapping is a nested section, an empty
    one a free-form mapping, ``None`` any single value, a list holds what its first item is (an
    empty list anything). Kairos users may write it under ``p2p:`` as before. No help.
    """
    return Section(name, *_options_from_defaults(defaults), help=NO_HELP, aliases=(f"p2p.{name}",))


def _options_from_defaults(defaults: Mapping[str, Any]) -> list[Option | Section]:
    options: list[Option | Section] = []
    for key, default in defaults.items():
        key = str(key)
        if isinstance(default, Mapping) and default:
            options.append(Section(key, *_options_from_defaults(default), help=NO_HELP))
        elif default is None:
            options.append(Option(key, None, None, NO_HELP))
        elif type(default) in (bool, int, float, str, list, dict):
            item_type = None
            if isinstance(default, list) and default and type(default[0]) in (bool, int, float, str):
                item_type = type(default[0])
            options.append(
                Option(
                    key,
                    type(default),
                    copy.deepcopy(default),
                    NO_HELP,
                    item_type=item_type,
                    finite=not (isinstance(default, float) and not math.isfinite(default)),
                )
            )
        else:
            options.append(Option(key, object, copy.deepcopy(default), NO_HELP))
    return options


def render_yaml(sections: Sequence[Section], width: int = 96) -> str:
    """The sections as a YAML config of their defaults, each option under its help as a comment.

    What ``kairos config defaults`` prints: a valid config file a user can start from.
    """
    lines: list[str] = []
    for section in sections:
        if lines:
            lines.append("")
        _render(section, 0, lines, width)
    return "\n".join(lines)


def _comment(text: str, indent: int, lines: list[str], width: int) -> None:
    prefix = " " * indent + "# "
    for paragraph in text.splitlines() or [""]:
        lines.extend(
            textwrap.wrap(paragraph, width - len(prefix), initial_indent=prefix, subsequent_indent=prefix) or [prefix.rstrip()]
        )


def _render(section: Section, indent: int, lines: list[str], width: int) -> None:
    import json

    note = section.help
    if section.aliases:
        note = f"{note} (Kairos: also {', '.join(section.aliases)})".strip()
    if note:
        _comment(note, indent, lines, width)
    lines.append(" " * indent + f"{_yaml_key(section.name)}:")
    for option in section.options:
        if isinstance(option, Section):
            _render(option, indent + 2, lines, width)
            continue
        _comment(_option_note(option), indent + 2, lines, width)
        # JSON is YAML: every default prints as a flow value that reads back as itself.
        lines.append(" " * (indent + 2) + f"{_yaml_key(option.name)}: {json.dumps(option.default)}")


def _option_note(option: Option) -> str:
    extra = []
    if option.minimum is not None and option.maximum is not None:
        extra.append(f"{option.minimum} to {option.maximum}")
    elif option.minimum is not None:
        extra.append(f"at least {option.minimum}")
    elif option.maximum is not None:
        extra.append(f"at most {option.maximum}")
    if option.choices is not None:
        extra.append("one of " + ", ".join(_show_choice(c) for c in option.choices))
    if option.aliases:
        extra.append("also " + ", ".join(option.aliases))
    if option.paths:
        extra.append("Kairos: " + ", ".join(_as_alias(path).path for path in option.paths))
    if option.no_effect:
        extra.append("no effect here: " + option.no_effect)
    return f"{option.help} [{'; '.join(extra)}]" if extra else option.help


def _yaml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z_][\w-]*", key) else f'"{key}"'
