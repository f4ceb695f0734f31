"""Model aliases and unification: which node names a requested model may go to.

A fleet whose nodes loaded the same weights from different places serves one model
under several names: a Hugging Face id on one node, `/data/models/internlm2_5-7b-chat`
on another. A node answers only to its own name (LMDeploy's 404 otherwise), so a
request must reach a node under that node's name, and its caller must read back the
name it asked for. This module only decides which names stand for which; the
rewriting both ways is lmfleet/transport/renaming.py, the choice of nodes the registry's.

- **Aliases** (`aliases={"internlm2.5-7b": ["internlm/internlm2_5-7b-chat",
  "/data/models/internlm2_5-7b-chat"]}`, LiteLLM's model groups): a request for the
  alias goes to any node serving any of its names (or the alias itself, so an alias
  may be one of the real names). A request naming one of the real names still goes
  only to the nodes of that name.
- **Unification** (`unify_models=True`, Olla's): served names that differ only by a
  path prefix or by case are one model, and a request for any of them goes to any
  of their nodes. A path prefix is a directory (`/data/models/`, `./`, `~/`): it says
  where the weights lie, not what they are. A Hugging Face organisation
  (`internlm/`) says what they are, so two names of the same last part under two
  organisations are *ambiguous*: reported (`ModelNames.ambiguous`, a warning in the
  log), never joined.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from lmfleet.plain_errors import ConfigError

Aliases = Mapping[str, Sequence[str]]
"""Alias -> the names nodes serve it under, as `attach(aliases=...)` takes them."""


@dataclass(frozen=True, slots=True)
class ModelNames:
    """Which served names each requested name may go to, for the fleet's models now."""

    groups: Mapping[str, frozenset[str]] = field(default_factory=dict)
    """Requested name -> every node name that serves it, for names that stand for more
    than themselves (aliases, and the members of unified groups)."""
    aliases: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """The configured aliases, each with its names (what `/v1/models` lists)."""
    ambiguous: tuple[str, ...] = ()
    """Each set of served names unification would not join, in words."""


def parse_aliases(aliases: Mapping[str, Sequence[str] | str] | None) -> dict[str, tuple[str, ...]]:
    """`aliases` checked: each a non-empty name for one or more non-empty names;
    `ConfigError` naming the bad entry."""
    checked: dict[str, tuple[str, ...]] = {}
    for alias, names in (aliases or {}).items():
        if not isinstance(alias, str) or not alias.strip():
            raise ConfigError(f"aliases: an alias must be a non-empty string, got {alias!r}")
        listed = [names] if isinstance(names, str) else list(names)
        if not listed or not all(isinstance(n, str) and n.strip() for n in listed):
            raise ConfigError(
                f"aliases[{alias!r}] must name one or more served models, got {names!r}"
            )
        checked[alias.strip()] = tuple(dict.fromkeys(n.strip() for n in listed))
    return checked


def parse_alias_flag(text: str) -> tuple[str, tuple[str, ...]]:
    """`--model-alias NAME=REAL[,REAL...]` -> (NAME, (REAL, ...)); `ConfigError` otherwise."""
    alias, sep, names = text.partition("=")
    listed = tuple(n.strip() for n in names.split(",") if n.strip())
    if not sep or not alias.strip() or not listed:
        raise ConfigError(f"--model-alias {text!r}: expected NAME=REAL[,REAL...]")
    return alias.strip(), listed


def model_names(
    served: Iterable[str], aliases: Mapping[str, tuple[str, ...]], *, unify: bool
) -> ModelNames:
    """The names for `served` (every name a node reports): the aliases, plus with
    `unify` the groups of names that differ only by a directory or by case."""
    groups: dict[str, frozenset[str]] = {}
    ambiguous: list[str] = []
    if unify:
        for members, why in _unified(sorted(set(served))):
            if why:
                ambiguous.append(why)
                continue
            for name in members:
                groups[name] = members
    for alias, names in aliases.items():
        wide = {alias, *names}
        for name in list(wide):
            wide |= groups.get(name, frozenset())
        groups[alias] = frozenset(wide)
    return ModelNames(groups, dict(aliases), tuple(ambiguous))


def _unified(served: list[str]) -> list[tuple[frozenset[str], str]]:
    """Served names grouped by their last path part, case aside: (group, "") for
    each group of two or more names to join, (group, why) for one that is ambiguous."""
    by_base: dict[str, list[str]] = {}
    for name in served:
        by_base.setdefault(name.rstrip("/").rsplit("/", 1)[-1].lower(), []).append(name)
    found: list[tuple[frozenset[str], str]] = []
    for base, names in sorted(by_base.items()):
        if len(names) < 2:
            continue
        orgs = {org.lower() for name in names if (org := _organisation(name))}
        if len(orgs) > 1:
            listed = ", ".join(names)
            why = (
                f"served names {listed} end alike ({base!r}) but come from different "
                f"organisations ({', '.join(sorted(orgs))}): not joined; name the ones "
                "that are one model in `aliases`"
            )
            found.append((frozenset(names), why))
        else:
            found.append((frozenset(names), ""))
    return found


def _organisation(name: str) -> str:
    """The Hugging Face organisation of a model id (`internlm` of
    `internlm/internlm2_5-7b-chat`); empty for a bare name or a filesystem path."""
    if name.startswith(("/", ".", "~")) or name.count("/") != 1:
        return ""
    return name.split("/", 1)[0]
