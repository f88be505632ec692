"""Bounce classes: which kind of failure a remote reply (code, enhanced code, text) reports, and what a
tenant's block policy does about each class; pure, except load_rules, which reads the rules files.

A reply is matched against rules (regexes for the big providers' texts): the operator's override
file first, then the shipped cmcd/bounce_rules.toml; the first rule that matches names the class. A
reply no rule knows falls back on its enhanced status code (RFC 3463, with the codes RFC 7372 and
RFC 7505 added), and on "other" when it has none. Never touches the store or a socket: the engine
classifies each outcome that is not a delivery, and the store applies the block policy to the
mail-log rows (cmcd/store/log_store.py). The host's [bounces] settings are the policy; a tenant may
set its own action for a class (tenants.block_actions), while the threshold, window and watch period
stay the host's.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from cmcd.errors import CmcdError

CLASSES = (
    "invalid_recipient", "bad_domain", "mailbox_full", "message_too_large", "spam_block", "policy",
    "authentication", "rate_limited", "tls", "dns", "other",
)  # fmt: skip
#: suppress: the recipient goes on the tenant's suppression list at once; count: after
#: count_threshold bounces of that class within count_window; alert: never suppressed, a tenant-level
#: alert metric counts it instead; none: only logged
ACTIONS = ("suppress", "count", "alert", "none")
#: what a tenant sets to go back to the host's action for a class ([bounces] actions)
DEFAULT = "default"
DEFAULT_ACTIONS: Mapping[str, str] = MappingProxyType(
    {
        "invalid_recipient": "suppress",
        "bad_domain": "suppress",
        "mailbox_full": "count",
        "message_too_large": "none",
        "spam_block": "alert",
        "policy": "none",
        "authentication": "alert",
        "rate_limited": "none",
        "tls": "none",
        "dns": "none",
        "other": "none",
    }
)
SHIPPED_RULES = Path(__file__).with_name("bounce_rules.toml")

#: RFC 3463 subjects and details, 4.x or 5.x alike, for a reply no rule names
_FALLBACK = {
    "1.1": "invalid_recipient", "1.6": "invalid_recipient", "1.10": "invalid_recipient",  # RFC 7505: null MX
    "1.2": "bad_domain", "2.2": "mailbox_full", "3.4": "message_too_large",
    "7.20": "authentication", "7.21": "authentication", "7.22": "authentication", "7.23": "authentication",
    "7.24": "authentication", "7.25": "authentication", "7.26": "authentication", "7.27": "authentication",
    "7.1": "policy", "7.28": "rate_limited", "7.5": "tls", "7.10": "tls", "4.3": "dns", "4.4": "dns",
    # RFC 6531 §3.5: "Non-ASCII addresses not permitted for that sender/recipient", the next hop's
    # rule (no SMTPUTF8), not the recipient's fault: policy, which never suppresses by default
    "6.7": "policy",
}  # fmt: skip
_ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")
_ENHANCED_PATTERN = re.compile(r"^[245xX]\.\d{1,3}\.\d{1,3}$")


class BounceRulesError(CmcdError, ValueError):
    """A rules file cmcd cannot use: the message names the file and the rule."""


@dataclass(frozen=True)
class Rule:
    bounce_class: str
    text: re.Pattern[str]  # searched in the whole reply ("550 5.1.1 ..."), case-insensitive
    codes: frozenset[int] = frozenset()  # basic reply codes it applies to; empty: any
    enhanced: tuple[str, ...] = ()  # enhanced codes ("5.7.26", "X.7.26" for 4 or 5); empty: any
    source: str = ""  # where the provider publishes the text

    def matches(self, code: int, enhanced: str, text: str) -> bool:
        return reply_matches(self.codes, self.enhanced, self.text, code, enhanced, text)


def reply_matches(
    codes: frozenset[int], patterns: tuple[str, ...], regex: re.Pattern[str], code: int, enhanced: str, text: str
) -> bool:
    """Whether a reply (CODE, ENHANCED, TEXT) is one a rule names: its basic code one of CODES, its
    enhanced code one of PATTERNS ("X.7.26": the class 4 or 5), REGEX found in TEXT (each left
    empty: any). The bounce rules here and the shaping rules (cmcd/shaping.py) match replies so."""
    if codes and code not in codes:
        return False
    if patterns and not any(_code_matches(p, enhanced) for p in patterns):
        return False
    return regex.search(text) is not None


def _code_matches(pattern: str, enhanced: str) -> bool:
    if pattern[0] in "xX":
        return enhanced[1:] == pattern[1:] and enhanced[:1] in ("4", "5")
    return enhanced == pattern


@dataclass(frozen=True)
class Rules:
    rules: tuple[Rule, ...] = ()
    files: tuple[str, ...] = ()  # where they came from, override first

    def __len__(self) -> int:
        return len(self.rules)


def parse_rules(text: str, origin: str) -> tuple[Rule, ...]:
    """The [[rule]] tables of a rules file, in order; BounceRulesError names ORIGIN and the rule."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise BounceRulesError(f"{origin}: not valid TOML: {exc}") from None
    unknown = set(data) - {"rule"}
    if unknown:
        raise BounceRulesError(f"{origin}: unknown key {sorted(unknown)[0]!r} (expected [[rule]] tables)")
    items = data.get("rule", [])
    if not isinstance(items, list):
        raise BounceRulesError(f"{origin}: rule: expected [[rule]] tables")
    return tuple(_rule(item, f"{origin}: rule {n}") for n, item in enumerate(items, 1))


def _rule(item: Any, where: str) -> Rule:
    if not isinstance(item, dict):
        raise BounceRulesError(f"{where}: expected a table")
    unknown = set(item) - {"class", "text", "codes", "enhanced", "source"}
    if unknown:
        raise BounceRulesError(
            f"{where}: unknown key {sorted(unknown)[0]!r} (known: class, text, codes, enhanced, source)"
        )
    cls = item.get("class")
    if cls not in CLASSES:
        raise BounceRulesError(f"{where}: class: expected one of {', '.join(CLASSES)}, got {cls!r}")
    pattern = item.get("text")
    if not isinstance(pattern, str) or not pattern:
        raise BounceRulesError(f"{where}: text: expected a regular expression")
    try:
        regex = re.compile(pattern, re.IGNORECASE)
    except re.error as exc:
        raise BounceRulesError(f"{where}: text: bad regular expression {pattern!r}: {exc}") from None
    codes = item.get("codes", [])
    if not isinstance(codes, list) or not all(
        isinstance(c, int) and not isinstance(c, bool) and 200 <= c <= 599 for c in codes
    ):
        raise BounceRulesError(f"{where}: codes: expected a list of reply codes like [550, 554], got {codes!r}")
    enhanced = item.get("enhanced", [])
    if not isinstance(enhanced, list) or not all(isinstance(e, str) and _ENHANCED_PATTERN.match(e) for e in enhanced):
        raise BounceRulesError(f'{where}: enhanced: expected a list like ["5.7.26", "X.2.2"], got {enhanced!r}')
    source = item.get("source", "")
    if not isinstance(source, str):
        raise BounceRulesError(f"{where}: source: expected a string (a URL)")
    return Rule(cls, regex, frozenset(codes), tuple(enhanced), source)


def load_rules(override: Path | None = None, shipped: Path = SHIPPED_RULES) -> Rules:
    """The operator's OVERRIDE file's rules (when given), then the shipped ones. Blocking (reads files):
    call it off the event loop. BounceRulesError when a file cannot be read or holds a bad rule."""
    rules: list[Rule] = []
    files: list[str] = []
    for path in (override, shipped):
        if path is None:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise BounceRulesError(f"{path}: cannot read the bounce rules: {exc}") from None
        rules += parse_rules(text, str(path))
        files.append(str(path))
    return Rules(tuple(rules), tuple(files))


def classify(rules: Rules, code: int, enhanced: str, text: str) -> str:
    """The class of a reply: the first rule that matches, else its enhanced code's (RFC 3463), else other.

    CODE is 0 for a failure cmcd decided itself (a DNS fault, a null MX, a TLS failure); TEXT is the
    reply as logged ("550 5.1.1 no such user")."""
    for rule in rules.rules:
        if rule.matches(code, enhanced, text):
            return rule.bounce_class
    if _ENHANCED.match(enhanced):
        _, subject, detail = enhanced.split(".")
        return _FALLBACK.get(f"{int(subject)}.{int(detail)}", "other")
    return "other"


@dataclass(frozen=True)
class BlockPolicy:
    """What a bounce of each class does to its recipient (the [bounces] settings)."""

    actions: Mapping[str, str] = field(default_factory=lambda: DEFAULT_ACTIONS)
    count_threshold: int = 3  # for action count: this many bounces of the class ...
    count_window_s: float = 7 * 86400.0  # ... within this long suppress the recipient
    watch_s: float = 30 * 86400.0  # a block expires this long after its last renewal; 0: never

    def action(self, bounce_class: str, tenant: Mapping[str, str] | None = None) -> str:
        """The action for BOUNCE_CLASS: the TENANT's own (its block_actions) when it set one, else the host's."""
        if tenant and bounce_class in tenant:
            return tenant[bounce_class]
        return self.actions.get(bounce_class, DEFAULT_ACTIONS.get(bounce_class, "none"))

    def effective(self, tenant: Mapping[str, str] | None = None) -> dict[str, str]:
        """Every class's action for a tenant whose own actions are TENANT, in CLASSES order."""
        return {cls: self.action(cls, tenant) for cls in CLASSES}

    def expires(self, ts: float) -> float | None:
        """When a block made (or renewed) at TS expires: None for never."""
        return ts + self.watch_s if self.watch_s > 0 else None


def block_policy(actions: Mapping[str, str], threshold: int, window_s: float, watch_s: float) -> BlockPolicy:
    """The policy of a configuration: ACTIONS override the defaults class by class."""
    return BlockPolicy(MappingProxyType({**DEFAULT_ACTIONS, **actions}), max(1, threshold), window_s, watch_s)


def check_tenant_actions(changes: Mapping[str, str]) -> None:
    """CHANGES (class -> action, or DEFAULT to go back to the host's) names known classes and
    actions; a ValueError names the first that is not and the known ones."""
    for cls, action in changes.items():
        if cls not in CLASSES:
            raise ValueError(f"unknown bounce class {cls!r} (known: {', '.join(CLASSES)})")
        if action != DEFAULT and action not in ACTIONS:
            raise ValueError(f"unknown block action {action!r} for {cls} (known: {', '.join(ACTIONS)}, or {DEFAULT})")


def apply_tenant_actions(current: Mapping[str, str], changes: Mapping[str, str]) -> dict[str, str]:
    """A tenant's own actions CURRENT with CHANGES made (DEFAULT removes a class's), in CLASSES order."""
    merged = {**current, **changes}
    return {cls: merged[cls] for cls in CLASSES if merged.get(cls, DEFAULT) != DEFAULT}


def tenant_actions_text(actions: Mapping[str, str]) -> str:
    """How a tenant's own actions are stored (tenants.block_actions): "class=action,..." ("" none)."""
    return ",".join(f"{cls}={actions[cls]}" for cls in CLASSES if cls in actions)


def parse_tenant_actions(text: str) -> Mapping[str, str]:
    """A stored tenants.block_actions; an entry this version does not know (a class or action
    a later version added) is left out, so the host's action applies to it."""
    out: dict[str, str] = {}
    for item in text.split(","):
        cls, _, action = item.partition("=")
        if cls in CLASSES and action in ACTIONS:
            out[cls] = action
    return MappingProxyType(out)
