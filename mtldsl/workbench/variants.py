"""`--set NAME.PROP=V1,V2`: one spec expanded into variants over properties of named declarations.

Takes a parsed syntax.Spec and the --set texts; gives one Variant per combination of values (the cartesian
product over every --set), each a new syntax tree printed with printer.print_spec and named after its
settings. Values are parsed by the spec parser itself (Note [Variant values]); nothing edits spec text.
No torch.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, replace

from .. import syntax as s
from ..diagnostics import did_you_mean
from ..parser import parse_text
from ..printer import print_spec

__all__ = ["PROPERTIES", "Setting", "SetError", "Variant", "expand", "parse_set", "safe_label"]

# Note [Variant values]
# ~~~~~~~~~~~~~~~~~~~~~
# A --set value is the text a spec would hold after the property's keyword (`2`, `[256, 128]`, `all`,
# `[user_id, item_id]`), or, for a gate's route (`g.experts[other]`), its flags: `forward`,
# `forward+backward` (also `backward`), or `off` (no such route). Each value is parsed as a one-block spec
# by parser.parse_text, so it is typed exactly as in a file, and a bad one gets the parser's message and
# hint. `owner` takes `shared` or `per_task` (a table or group that becomes one per task). The variant tree
# is printed by printer.print_spec and checked like any spec before anything trains.

PROPERTIES: dict[type, tuple[str, ...]] = {
    s.EmbeddingDecl: ("dim", "fields", "dense", "copies", "pool", "owner"),
    s.ExpertsDecl: ("count", "input", "mlp", "activation", "dropout", "batch_norm", "owner"),
    s.GateDecl: ("input", "mlp", "activation", "dropout", "batch_norm", "owner"),
}
_KEYWORD = {s.EmbeddingDecl: "embedding", s.ExpertsDecl: "experts", s.GateDecl: "gate"}
_ROUTE = re.compile(r"(?P<group>[a-z][a-z0-9_]*)(\[(?P<sel>[a-z][a-z0-9_]*)\])?$")
_FLAGS = {"forward": ("forward",), "forward+backward": ("forward", "backward"),
          "off": None}


class SetError(ValueError):
    """A --set that names an unknown declaration or property, or holds a bad value; one line, with a hint."""


@dataclass(frozen=True)
class Setting:
    """One parsed --set: a declaration, a property (or a route `group[selector]`) and its values as written."""

    name: str
    prop: str
    values: tuple[str, ...]

    def label(self, value: str) -> str:
        return f"{self.name}.{self.prop}={value}"


@dataclass(frozen=True)
class Variant:
    label: str  # `stem experts.count=2 g.experts[other]=off`; the spec's model name alone without --set
    spec: s.Spec
    text: str  # print_spec(spec)
    settings: tuple[tuple[str, str], ...]  # ((`experts.count`, `2`), ...)


def _split_values(text: str) -> list[str]:
    """Comma-separated values; commas inside [...] or (...) belong to the value."""
    out, depth, current = [], 0, ""
    for ch in text:
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(current.strip())
            current = ""
        else:
            current += ch
    out.append(current.strip())
    return out


def parse_set(text: str) -> Setting:
    """`NAME.PROP=V1,V2` -> Setting; a malformed one is a SetError."""
    head, eq, values = text.partition("=")
    name, dot, prop = head.strip().partition(".")
    if not eq or not dot or not name or not prop:
        raise SetError(f"--set {text!r}: expected NAME.PROP=V1,V2 (e.g. experts_shared.count=1,2)")
    parts = _split_values(values)
    if any(not v for v in parts):
        raise SetError(f"--set {text!r}: an empty value")
    return Setting(name, prop.strip(), tuple(parts))


def _declarations(spec: s.Spec) -> dict[str, s.EmbeddingDecl | s.ExpertsDecl | s.GateDecl]:
    found: dict[str, s.EmbeddingDecl | s.ExpertsDecl | s.GateDecl] = {}
    for item in spec.items:
        blocks = item.blocks if isinstance(item, s.LevelsDecl) else (item,)
        for block in blocks:
            if isinstance(block, s.EmbeddingDecl | s.ExpertsDecl | s.GateDecl):
                found.setdefault(block.name, block)
    return found


def _parse_one(decl: s.EmbeddingDecl | s.ExpertsDecl | s.GateDecl, body: str, where: str) -> object:
    parsed = parse_text(f"{_KEYWORD[type(decl)]} {decl.name} shared {{ {body} }}", where)
    if not isinstance(parsed, s.Spec):
        d = parsed[0]
        raise SetError(f"{where}: {d.message}" + (f" ({d.hint})" if d.hint else ""))
    return parsed.items[0]


def _with_route(decl: s.GateDecl, route: str, value: str, where: str) -> s.GateDecl:
    match = _ROUTE.match(route)
    if value not in _FLAGS:
        raise SetError(f"{where}: a route's visibility is {', '.join(_FLAGS)}" +
                       (f" ({hint})" if (hint := did_you_mean(value, list(_FLAGS))) else ""))
    assert match is not None
    group, sel = match["group"], match["sel"]
    written = [r for r in decl.routes if r.group.name == group and _selector_text(r) == (sel or "")]
    flags = _FLAGS[value]
    routes = [r for r in decl.routes if r not in written]
    if flags is not None:
        text = f"mix {route} {' '.join(flags)}"
        new = _parse_one(decl, text, where)
        assert isinstance(new, s.GateDecl)
        index = decl.routes.index(written[0]) if written else len(routes)
        routes.insert(index, new.routes[0])
    return replace(decl, routes=tuple(routes))


def _selector_text(route: s.RouteDecl) -> str:
    if route.selector is s.Selector.all:
        return ""
    return route.task.name if route.task is not None else route.selector.value


def _with(decl: s.EmbeddingDecl | s.ExpertsDecl | s.GateDecl, prop: str, value: str,
          where: str) -> s.EmbeddingDecl | s.ExpertsDecl | s.GateDecl:
    if prop == "owner":
        if value not in ("shared", "per_task"):
            raise SetError(f"{where}: owner is shared or per_task")
        return replace(decl, owner=s.Owner(s.OwnerKind.shared if value == "shared" else s.OwnerKind.per_task))
    new = _parse_one(decl, f"{prop} {value}", where)
    (parsed,) = new.props  # type: ignore[attr-defined]
    props = list(decl.props)
    at = next((i for i, p in enumerate(props) if p.key == prop), None)
    if at is None:
        props.append(parsed)
    else:
        props[at] = parsed
    return replace(decl, props=tuple(props))


def _check_setting(spec: s.Spec, setting: Setting, path: str) -> None:
    decls = _declarations(spec)
    decl = decls.get(setting.name)
    if decl is None:
        hint = did_you_mean(setting.name, list(decls))
        raise SetError(f"--set {setting.name}.{setting.prop}: {path} declares no embedding, experts or gate "
                       f"'{setting.name}'" + (f" ({hint})" if hint else f"; it declares {', '.join(decls)}"))
    allowed = PROPERTIES[type(decl)]
    if isinstance(decl, s.GateDecl) and _ROUTE.match(setting.prop) and setting.prop not in allowed:
        groups = {r.group.name for r in decl.routes}
        if _ROUTE.match(setting.prop)["group"] in groups:  # type: ignore[index]
            return
    if setting.prop not in allowed:
        hint = did_you_mean(setting.prop, allowed)
        extra = ", or a route such as experts[other]" if isinstance(decl, s.GateDecl) else ""
        raise SetError(f"--set {setting.name}.{setting.prop}: unknown property '{setting.prop}' of "
                       f"{_KEYWORD[type(decl)]} '{decl.name}'" + (f" ({hint})" if hint else "") +
                       f"; one of {', '.join(allowed)}{extra}")


def _apply(spec: s.Spec, setting: Setting, value: str) -> s.Spec:
    where = f"--set {setting.label(value)}"

    def change(block: s.Item) -> s.Item:
        if not isinstance(block, s.EmbeddingDecl | s.ExpertsDecl | s.GateDecl) or block.name != setting.name:
            return block
        if isinstance(block, s.GateDecl) and setting.prop not in PROPERTIES[s.GateDecl]:
            return _with_route(block, setting.prop, value, where)
        return _with(block, setting.prop, value, where)

    items = []
    for item in spec.items:
        if isinstance(item, s.LevelsDecl):
            items.append(replace(item, blocks=tuple(change(b) for b in item.blocks)))  # type: ignore[misc]
        else:
            items.append(change(item))
    return replace(spec, items=tuple(items))


def expand(spec: s.Spec, name: str, settings: list[Setting], path: str = "<spec>") -> list[Variant]:
    """Every combination of the settings' values applied to `spec`; [the spec itself] without settings."""
    for setting in settings:
        _check_setting(spec, setting, path)
    if not settings:
        return [Variant(name, spec, print_spec(spec), ())]
    out = []
    for combo in itertools.product(*(st.values for st in settings)):
        tree = spec
        for setting, value in zip(settings, combo):
            tree = _apply(tree, setting, value)
        pairs = tuple((f"{st.name}.{st.prop}", v) for st, v in zip(settings, combo))
        label = " ".join([name, *(f"{k}={v}" for k, v in pairs)])
        out.append(Variant(label, tree, print_spec(tree), pairs))
    return out


def safe_label(label: str) -> str:
    """A variant's label as a folder name: letters, digits and `._=-+` kept, the rest `_`."""
    return re.sub(r"[^A-Za-z0-9._=+-]+", "_", label).strip("_")
