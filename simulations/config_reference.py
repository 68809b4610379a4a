"""The configuration reference (docs/configuration.md), generated from the typed schema
so it cannot drift: `python -m simulations.config_reference` prints it; the site's
hook (docs/hooks/config_reference.py) builds it into the page.

Every key comes from the schema: the dataclasses of fedkd/config/ (FedKDConfig and its
sections, walked, so a new section or field appears with no edit here), the `Params`
of every registered strategy and mitigation, and the option files of conf/'s groups.
Per key: its type as written, its default, what is allowed (the section's own `check`
given a value it must refuse: its ConfigError names what is allowed), and its comment
(inline, or the lines above the field; else the same key's comment in conf/).
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import json
import re
import tokenize
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

from fedkd.config import CONF_DIR, FedKDConfig
from fedkd.errors import ConfigError

BAD = "\x00not-a-value"  # a string no check accepts
NUMBER_PROBES = (-1, 10**9)
COMMANDS = ("fedkd-sim", "fedkd-", "python ")  # where a conf file's example commands begin


@dataclasses.dataclass
class Row:
    key: str
    type: str
    default: str
    allowed: str
    doc: str


def sections(root: type = FedKDConfig, prefix: str = "") -> Iterator[tuple[str, type]]:
    """(dotted prefix, dataclass) for the root and every section below it: a field
    whose default is a dataclass instance is a section of its own."""
    yield prefix, root
    for f in dataclasses.fields(root):
        value = default_of(f)
        if dataclasses.is_dataclass(value):
            yield from sections(type(value), f"{prefix}{f.name}.")


def default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    factory = f.default_factory
    return dataclasses.MISSING if factory is dataclasses.MISSING else factory()


def leaf_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of `cls` that are keys, not sections."""
    return [f for f in dataclasses.fields(cls) if not dataclasses.is_dataclass(default_of(f))]


def field_comments(cls: type) -> dict[str, str]:
    """Field name -> its comment in the source of the class that declares it (the
    trailing comment, after the comment lines right above the field)."""
    found: dict[str, str] = {}
    for owner in reversed(cls.__mro__):
        try:
            source = inspect.getsource(owner) if inspect.get_annotations(owner) else ""
        except (OSError, TypeError):
            continue  # made at run time (make_dataclass): no source, no comments
        found |= _comments_in(source, inspect.get_annotations(owner))
    return found


def _comments_in(source: str, names: dict[str, Any]) -> dict[str, str]:
    lines = source.splitlines()
    trailing: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            trailing[tok.start[0] - 1] = tok.string.lstrip("#").strip()
    out: dict[str, str] = {}
    for i, line in enumerate(lines):
        match = re.match(r"^    (\w+)\s*:", line)
        if not match or match.group(1) not in names or match.group(1) in out:
            continue
        above, j = [], i - 1
        while j >= 0 and lines[j].strip().startswith("#"):
            above.insert(0, trailing[j])
            j -= 1
        out[match.group(1)] = trailing[i] if i in trailing else " ".join(above)
    return out


def yaml_comments() -> dict[str, str]:
    """Dotted key -> the comment beside it in conf/: conf/config.yaml first, then each
    group's files, for that group's own keys only (experiments set keys for a purpose
    of their own, so their comments are not the keys' descriptions)."""
    found: dict[str, str] = {}
    files = [CONF_DIR / "config.yaml", *sorted(CONF_DIR.glob("*/*.yaml"))]
    for path in files:
        text, own = path.read_text(), path.parent.name
        if own == "experiment":
            continue
        group = "" if path.parent == CONF_DIR or "@package _global_" in text else own
        stack: list[tuple[int, str]] = []
        for line in text.splitlines():
            match = re.match(r"^(\s*)(\w+):[^#]*(?:#\s*(.*))?$", line)
            if not match:
                continue
            indent, key, comment = len(match.group(1)), match.group(2), match.group(3)
            stack = [(d, k) for d, k in stack if d < indent] + [(indent, key)]
            dotted = ".".join(([group] if group else []) + [k for _, k in stack])
            mine = path.parent == CONF_DIR or dotted.startswith(own + ".")
            if comment and mine and dotted not in found:
                found[dotted] = comment.strip()
    return found


def show(value: Any) -> str:
    if value is dataclasses.MISSING or value == "???":  # omegaconf's MISSING
        return "(a config group choice)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | dict):
        return json.dumps(value)
    return str(value)


def type_name(f: dataclasses.Field) -> str:
    return f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))


def probes(f: dataclasses.Field, value: Any) -> list[Any]:
    kind = type_name(f)
    if isinstance(value, bool) or kind == "bool":
        return []
    if isinstance(value, list) or kind.startswith("list"):
        return [[BAD]]
    if isinstance(value, float) or re.search(r"\bfloat\b", kind):
        return [float(n) for n in NUMBER_PROBES] + [BAD]
    if isinstance(value, int) or re.search(r"\bint\b", kind):
        return [*NUMBER_PROBES, BAD]
    return [BAD]


def allowed(obj: Any, f: dataclasses.Field, key: str, check: Callable[[], None]) -> str:
    """What `check` allows for `obj.<f>`: the ConfigError it raises on values it
    must refuse, for this key; '' where it refuses none of them."""
    kept = getattr(obj, f.name)
    try:
        for bad in probes(f, kept):
            object.__setattr__(obj, f.name, bad)
            try:
                check()
            except ConfigError as exc:
                if exc.key == key or exc.key.startswith(key + "["):
                    return exc.allowed
            except Exception:  # a check that cannot take the probe's type at all
                continue
        return "true or false" if isinstance(kept, bool) else ""
    finally:
        object.__setattr__(obj, f.name, kept)


def checker(obj: Any, cfg: FedKDConfig) -> Callable[[], None]:
    """obj.check(), or obj.check(cfg) for a section checked against the whole config."""
    check = getattr(obj, "check", None) or (lambda: None)
    takes_cfg = len(inspect.signature(check).parameters) >= 1
    return (lambda: check(cfg)) if takes_cfg else check


def rows(cls: type, obj: Any, prefix: str, cfg: FedKDConfig, yaml_docs: dict) -> list[Row]:
    comments, check, out = field_comments(cls), checker(obj, cfg), []
    for f in leaf_fields(cls):
        key = prefix + f.name
        doc = comments.get(f.name) or yaml_docs.get(key, "")
        out.append(Row(key, type_name(f), show(default_of(f)), allowed(obj, f, key, check), doc))
    return out


def schema_rows(root: type = FedKDConfig) -> dict[str, list[Row]]:
    """Section prefix ('' for the top level) -> its rows, for `root` and every section."""
    cfg, docs = root(), yaml_comments()
    out = {}
    for prefix, cls in sections(root):
        obj = cfg
        for part in filter(None, prefix.split(".")):
            obj = getattr(obj, part)
        out[prefix.rstrip(".")] = rows(cls, obj, prefix, cfg, docs)
    return out


def component_rows(key: str) -> dict[str, list[Row]]:
    """Registered name -> the rows of its Params, for `strategy` or `mitigation`."""
    from fedkd.mitigations import MITIGATIONS
    from strategies import STRATEGIES

    registry = {"strategy": STRATEGIES, "mitigation": MITIGATIONS}[key]
    cfg, docs = FedKDConfig(), yaml_comments()
    out = {}
    for name in registry.names():
        params = registry.get(name).Params()
        found = rows(type(params), params, f"{key}.", cfg, docs)
        out[name] = [r for r in found if r.key != f"{key}.name"]
    return out


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table(found: list[Row]) -> list[str]:
    out = ["| key | type | default | allowed | what it is |", "|---|---|---|---|---|"]
    for r in found:
        default = f"`{r.default}`" if r.default else ""  # a code span keeps its pipes
        out.append(f"| `{r.key}` | `{r.type}` | {default} | {cell(r.allowed)} | {cell(r.doc)} |")
    return [*out, ""]


def docstring(cls: type) -> str:
    doc = inspect.getdoc(cls) or ""
    generated = doc.startswith(cls.__name__ + "(")  # dataclass's own signature text
    return "" if generated else " ".join(doc.split("\n\n")[0].split())


def group_table(group: Path) -> list[str]:
    """The option files of one config group: what each is and the keys it sets."""
    out = ["| option | what it is | sets |", "|---|---|---|"]
    for path in sorted(group.glob("*.yaml")):
        text = path.read_text()
        node = yaml.safe_load(text) or {}
        chosen = [
            f"{k.replace('override ', '')}={v}"
            for d in node.pop("defaults", [])
            for k, v in (d.items() if isinstance(d, dict) else [])
        ]
        sets = [*chosen, *(f"{k}={show(v)}" for k, v in flatten(node))]
        codes = "; ".join(f"`{c}`" for c in sets) or "nothing (the schema's defaults)"
        out.append(f"| `{group.name}={path.stem}` | {cell(head_comment(text))} | {codes} |")
    return [*out, ""]


def head_comment(text: str) -> str:
    """A conf file's leading comment, up to where its example commands begin."""
    head = []
    for line in text.splitlines():
        words = line.lstrip("#").strip()
        if not line.startswith("#") or words.startswith(COMMANDS):
            break
        if "@package" not in line:
            head.append(words)
    return " ".join(head)


def flatten(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if node == {} and not prefix:
        return  # an option file that sets nothing
    if isinstance(node, dict) and node:
        for key, value in node.items():
            yield from flatten(value, f"{prefix}{key}.")
    else:
        yield prefix.rstrip("."), node


def render(root: type = FedKDConfig) -> str:
    """The whole reference in Markdown: config groups, every schema section, and the
    settings of every registered strategy and mitigation."""
    lines = ["## Config groups", ""]
    lines += [
        "`GROUP=OPTION` picks a file of `conf/GROUP/`; the keys it sets are listed as"
        " `key=value` (a `# @package _global_` file sets keys anywhere in the config).",
        "",
    ]
    for group in sorted(p for p in CONF_DIR.iterdir() if p.is_dir()):
        lines += [f"### Group `{group.name}`", "", *group_table(group)]
    lines += ["## Schema sections", ""]
    found = schema_rows(root)
    for prefix, cls in sections(root):
        name = prefix.rstrip(".")
        title = f"`{name}`" if name else "Top-level keys"
        lines += [f"### {title}", ""]
        lines += [t for t in [docstring(cls)] if t] + ([""] if docstring(cls) else [])
        lines += table(found[name])
    for key in ("strategy", "mitigation"):
        lines += [f"## `{key}`: each {key}'s own settings", ""]
        for name, found in component_rows(key).items():
            lines += [f"### `{key}={name}`", ""]
            lines += table(found) if found else ["No settings besides `name`.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    print(render())
