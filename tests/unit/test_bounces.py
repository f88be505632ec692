"""The bounce classifier: real provider replies land in their class, the override file comes first, a
bad rules file is named with its rule, and replies no rule knows fall back on their enhanced code."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from cmcd import bounces, policy
from cmcd.bounces import BlockPolicy, BounceRulesError, classify, load_rules, parse_rules

DATA = Path(__file__).resolve().parents[1] / "data" / "provider_replies.toml"
REPLIES: list[dict[str, Any]] = tomllib.loads(DATA.read_text())["reply"]
SHIPPED = load_rules()


def _outcome(reply: str) -> policy.Outcome:
    code, _, text = reply.partition(" ")
    return policy.classify(int(code), text)


def test_the_data_file_has_enough_cited_replies() -> None:
    assert len(REPLIES) >= 22
    assert len({r["provider"] for r in REPLIES}) >= 6
    for r in REPLIES:
        assert r["source"].startswith("https://") and r["class"] in bounces.CLASSES


@pytest.mark.parametrize("case", REPLIES, ids=[f"{r['provider']}-{r['reply'][:40]}" for r in REPLIES])
def test_provider_reply_lands_in_its_class(case: dict[str, Any]) -> None:
    o = _outcome(case["reply"])
    assert classify(SHIPPED, o.code, o.enhanced, o.text) == case["class"]


def test_every_shipped_rule_cites_a_source() -> None:
    assert len(SHIPPED) > 20
    assert all(r.source.startswith("https://") for r in SHIPPED.rules)


FALLBACK = [
    ("5.1.1", "invalid_recipient"), ("5.1.6", "invalid_recipient"), ("5.1.10", "invalid_recipient"),
    ("5.1.2", "bad_domain"), ("4.2.2", "mailbox_full"), ("5.2.2", "mailbox_full"), ("5.3.4", "message_too_large"),
    ("5.7.20", "authentication"), ("5.7.23", "authentication"), ("5.7.27", "authentication"), ("5.7.1", "policy"),
    ("4.7.28", "rate_limited"), ("4.7.5", "tls"), ("5.7.10", "tls"), ("4.4.3", "dns"), ("5.4.4", "dns"),
    ("5.5.1", "other"), ("4.7.0", "other"), ("", "other"),
]  # fmt: skip


@pytest.mark.parametrize(("enhanced", "expected"), FALLBACK, ids=[f"{e or 'none'}-{c}" for e, c in FALLBACK])
def test_a_reply_no_rule_knows_falls_back_on_its_enhanced_code(enhanced: str, expected: str) -> None:
    code = 550 if enhanced.startswith("5") else 450
    assert classify(SHIPPED, code, enhanced, f"{code} {enhanced} xyzzy".replace("  ", " ")) == expected


OWN_FAULTS = [
    ("null-mx", policy.permanent_failure("5.1.10", "domain x.test accepts no mail (null MX, RFC 7505)"), "bad_domain"),
    ("nxdomain", policy.permanent_failure("5.1.2", "domain x.test does not exist (NXDOMAIN)"), "bad_domain"),
    ("mx-host-nxdomain", policy.permanent_failure("5.4.4", "MX host mx.x.test of x.test does not exist (NXDOMAIN)"),
     "dns"),
    ("dns-failure", policy.network_fault("DNS lookup of x.test MX failed: Timeout", "4.4.3"), "dns"),
    ("tls", policy.network_fault("mx.x.test: TLS handshake failed", "4.7.5"), "tls"),
    ("no-answer", policy.network_fault("connection refused"), "other"),
    ("hops", policy.permanent_failure("5.4.6", "too many hops (31 Received: fields)"), "other"),
]  # fmt: skip


@pytest.mark.parametrize(("outcome", "expected"), [c[1:] for c in OWN_FAULTS], ids=[c[0] for c in OWN_FAULTS])
def test_cmcds_own_faults_have_code_0_and_a_class(outcome: policy.Outcome, expected: str) -> None:
    assert outcome.code == 0
    assert classify(SHIPPED, outcome.code, outcome.enhanced, outcome.text) == expected


def test_the_override_file_comes_before_the_shipped_rules(tmp_path: Path) -> None:
    override = tmp_path / "mine.toml"
    override.write_text('[[rule]]\nclass = "policy"\ntext = "does not exist"\ncodes = [550]\nenhanced = ["X.1.1"]\n')
    rules = load_rules(override)
    assert rules.files == (str(override), str(bounces.SHIPPED_RULES))
    reply = "550 5.1.1 The email account that you tried to reach does not exist."
    o = _outcome(reply)
    assert classify(rules, o.code, o.enhanced, o.text) == "policy"
    assert classify(SHIPPED, o.code, o.enhanced, o.text) == "invalid_recipient"
    o = _outcome("450 4.1.1 The email account that you tried to reach does not exist.")  # X.1.1: 4 or 5
    assert classify(rules, o.code, o.enhanced, o.text) == "invalid_recipient"  # the code list says 550 only


BAD = [
    ("bad-regex", '[[rule]]\nclass = "policy"\ntext = "("\n', "rule 1: text: bad regular expression"),
    ("bad-class", '[[rule]]\nclass = "policy"\ntext = "a"\n[[rule]]\nclass = "nope"\ntext = "b"\n',
     "rule 2: class: expected one of"),
    ("unknown-key", '[[rule]]\nclass = "policy"\ntext = "a"\nregex = "b"\n', "rule 1: unknown key 'regex'"),
    ("bad-code", '[[rule]]\nclass = "policy"\ntext = "a"\ncodes = [99]\n', "rule 1: codes: expected"),
    ("bad-enhanced", '[[rule]]\nclass = "policy"\ntext = "a"\nenhanced = ["5.7"]\n', "rule 1: enhanced: expected"),
    ("no-text", '[[rule]]\nclass = "policy"\n', "rule 1: text: expected"),
    ("not-toml", "[[rule]\n", "not valid TOML"),
    ("top-level-key", 'class = "policy"\n', "unknown key 'class'"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "message"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_a_bad_rules_file_is_named_with_its_rule(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "override.toml"
    path.write_text(text)
    with pytest.raises(BounceRulesError) as e:
        load_rules(path)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value)
    with pytest.raises(BounceRulesError, match="^x.toml: "):
        parse_rules(text, "x.toml")


def test_a_missing_override_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(BounceRulesError, match="nope.toml: cannot read"):
        load_rules(tmp_path / "nope.toml")


POLICY = [
    ("invalid_recipient", "suppress"), ("bad_domain", "suppress"), ("mailbox_full", "count"),
    ("authentication", "alert"), ("spam_block", "alert"), ("policy", "none"), ("other", "none"),
    ("unheard_of", "none"),
]  # fmt: skip


@pytest.mark.parametrize(("cls", "action"), POLICY, ids=[c for c, _ in POLICY])
def test_default_block_policy(cls: str, action: str) -> None:
    assert BlockPolicy().action(cls) == action


def test_configured_actions_override_class_by_class() -> None:
    p = bounces.block_policy({"mailbox_full": "suppress", "policy": "alert"}, 0, 60.0, 0.0)
    assert (p.action("mailbox_full"), p.action("policy"), p.action("invalid_recipient")) == (
        "suppress", "alert", "suppress",
    )  # fmt: skip
    assert p.count_threshold == 1 and p.expires(100.0) is None
    assert BlockPolicy().expires(100.0) == 100.0 + 30 * 86400


def test_the_dsn_names_each_recipients_class() -> None:
    from cmcd.queue import dsn

    raw = dsn.build(
        hostname="mx.cmcd.test", queue_id="Q1", sender="alice@acme.test", arrival=0.0, now=1.0,
        recipients=[
            dsn.failed("bob@dst.test", "552 5.2.2 mailbox full", "mx1.dst.test", False, "mailbox_full"),
            dsn.failed("carol@dst.test", "550 5.7.1 no", "mx1.dst.test", False),
        ],
        headers=b"Subject: x\r\n",
    )  # fmt: skip
    assert b"<bob@dst.test>: 552 5.2.2 mailbox full (class: mailbox_full)\r\n" in raw
    assert b"Diagnostic-Code: smtp; 552 5.2.2 mailbox full\r\nX-Cmcd-Bounce-Class: mailbox_full\r\n" in raw
    assert raw.count(b"X-Cmcd-Bounce-Class") == 1  # carol's reply was not classed


def test_check_config_names_a_bad_rules_file(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from cmcd.daemon.cli import main

    rules = tmp_path / "rules.toml"
    rules.write_text('[[rule]]\nclass = "policy"\ntext = "(oops"\n')
    cfg = tmp_path / "cmcd.toml"
    cfg.write_text(f'[smtp]\nlisten = []\nlisten_tls = []\n[bounces]\noverride_file = "{rules}"\n')
    result = CliRunner().invoke(main, ["check-config", "--config", str(cfg)])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"cmcd: {rules}: rule 1: text: bad regular expression '(oops': missing ), unterminated subpattern at position 0"
    ]
    rules.write_text('[[rule]]\nclass = "policy"\ntext = "oops"\n')
    result = CliRunner().invoke(main, ["check-config", "--config", str(cfg)])
    assert result.exit_code == 0 and result.output == f"{cfg}: ok\n"
