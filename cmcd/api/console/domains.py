"""The console's Domains pages: the tenant's sending domains, the DNS records each needs (DKIM
keys, SPF and DMARC suggestions) with what the last DNS check found, a check run on request, and
the DKIM keys' rotation state.

Reads and the check are tenancy's (cmcd.tenancy.domains): the records and their rules are worked
out there, the check's result is recorded there, key by key. The check's DNS lookup goes through
the daemon's resolver (dns.nameservers, `api.resolver`). Adding a domain and rotating its keys
stay with the operator (cmcctl); no page here makes, imports or retires a key. Another tenant's
domain is "not found", like one that does not exist.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from cmcd.api.console import i18n
from cmcd.api.console.web import Console, ConsoleError, Page
from cmcd.dns_check import check as dns_check
from cmcd.errors import NotFound
from cmcd.tenancy.domains import Record, domain_name, zone_lines
from cmcd.tenancy.refusals import Reason, Refused
from cmcd.textout import escape_controls


def register(c: Console) -> None:
    c.get("/domains", domain_list)
    c.get("/domains/{name}", domain_page)
    c.post("/domains/{name}/check", domain_check)


# -- the list ---------------------------------------------------------------------------------


async def domain_list(page: Page) -> web.StreamResponse:
    api = page.api
    tenant = page.caller.tenant
    domains = await api.astore.call(api.store.domains, tenant)
    rows = []
    for d in domains:
        keys = await api.tenancy.domains.keys(tenant, d.name)
        signing = [k for k in keys if k["state"] == "active"]
        rows.append(
            {
                "name": d.name,
                "signing": ", ".join(f"{k['selector']} ({k['algorithm']})" for k in signing),
                "unpublished": sum(1 for k in keys if k["state"] != "retired" and k["dns_state"] != "published"),
            }
        )
    return page.render("domains.html", domains=rows)


# -- one domain -------------------------------------------------------------------------------


async def domain_page(page: Page) -> web.StreamResponse:
    return await _show(page, page.request.match_info["name"])


async def domain_check(page: Page) -> web.StreamResponse:
    """Look the domain's records up now; the page shows what was found, record by record (each
    DKIM key's finding is also kept: a key known to be missing from DNS does not sign)."""
    api = page.api
    name = page.request.match_info["name"]
    caller = page.caller

    async def lookup(recs: list[Record]) -> list[Record]:
        return await dns_check(api.resolver, recs)

    try:
        results = await api.tenancy.domains.check(
            page.op("console.domains.check", domain_name(name)), caller.tenant, name, api.config.server.hostname, lookup
        )
    except Refused as exc:
        if exc.refusal.reason is Reason.NOT_FOUND:
            raise ConsoleError(404, page.t("error.not_found")) from None
        raise ConsoleError(400, exc.refusal.text) from None
    return await _show(page, name, results)


async def _show(page: Page, name: str, results: list[Record] | None = None) -> web.StreamResponse:
    api = page.api
    tenant = page.caller.tenant
    try:
        keys = await api.tenancy.domains.keys(tenant, name)
        recs = await api.tenancy.domains.records(tenant, name, api.config.server.hostname)
        checked, kept = await api.astore.call(api.store.domain_last_check, tenant, domain_name(name))
    except NotFound:  # deleted between the two reads
        raise ConsoleError(404, page.t("error.not_found")) from None
    except Refused as exc:
        if exc.refusal.reason is Reason.NOT_FOUND:
            raise ConsoleError(404, page.t("error.not_found")) from None
        raise ConsoleError(400, exc.refusal.text) from None
    domain = domain_name(name)
    by_selector = {k["selector"]: k for k in keys}
    found = {(r["name"], r["expected"]): r for r in results or []}
    last = {(r["name"], r["expected"]): r["status"] for r in kept}
    rows = []
    for r in recs:
        key = by_selector.get(r.get("selector", ""))
        kind = "dkim" if key is not None else "spf" if r["value"].startswith("v=spf1") else "dmarc"
        result = found.get((r["name"], r["value"]))
        rows.append(
            {
                "kind": kind,
                "purpose": page.t(f"domains.purpose.{kind}", **_key_words(page, key)),
                "type": r["type"],
                "name": r["name"],
                "value": r["value"],
                "last": _last_word(page, key, last.get((r["name"], r["value"])), checked),
                "now": _result(page, result) if result is not None else None,
            }
        )
    key_rows = [
        _key_words(page, k)
        | {
            "dns": _state_word(page, k["dns_state"]),
            "created": page.when(k["created"]),
            "changed": page.when(k["changed"]),
        }
        for k in keys
    ]
    return page.render(
        "domains_show.html",
        domain=domain,
        records=rows,
        zone="\n".join(zone_lines(recs)),
        keys=key_rows,
        checked=results is not None,
    )


def _key_words(page: Page, key: dict[str, Any] | None) -> dict[str, str]:
    if key is None:
        return {}
    return {"selector": key["selector"], "algorithm": key["algorithm"], "state": page.t(f"domains.key.{key['state']}")}


def _last_word(page: Page, key: dict[str, Any] | None, status: str | None, checked: float | None) -> str:
    """What the last check found for a record: a DKIM key's kept state, else the kept result of
    the domain's last check (with its time), else that it was not checked since it was published."""
    if key is not None:
        return _state_word(page, key["dns_state"])
    if status is None or checked is None:
        return page.t("domains.not_kept")
    return page.t("domains.last_at", state=_state_word(page, status), when=page.when(checked, seconds=False))


def _state_word(page: Page, state: str) -> str:
    return page.t(f"domains.dns.{state}") if i18n.has(f"domains.dns.{state}") else state


def _result(page: Page, result: Record) -> dict[str, str]:
    """What this check found for one record: its status word, why, and what DNS holds (outsiders'
    text: control characters made visible)."""
    status = str(result["status"])
    return {
        "status": status,
        "word": _state_word(page, status),
        "detail": str(result.get("detail") or ""),
        "found": escape_controls(" | ".join(str(f) for f in result.get("found") or [])),
    }


i18n.add(
    {
        "en": {
            "domains.title": "Domains",
            "domains.intro": "The domains your tenant sends as, and the DNS records each one needs.",
            "domains.operator": (
                "Adding a domain and rotating its DKIM keys are done by your operator (cmcctl domain add, "
                "cmcctl domain dkim-rotate): ask them through Contact the operator."
            ),
            "domains.name": "Domain",
            "domains.signing": "Signing keys",
            "domains.unpublished": "Keys not seen in DNS",
            "domains.none": "Your tenant has no domains yet: ask your operator to add one.",
            "domains.records": "DNS records to publish",
            "domains.records_hint": (
                "Publish each value as a TXT record at its name. SPF and DMARC are suggestions: merge them "
                "with records you already have."
            ),
            "domains.purpose": "Purpose",
            "domains.type": "Type",
            "domains.record_name": "Name",
            "domains.value": "Value",
            "domains.last": "Last check",
            "domains.now": "This check",
            "domains.found": "found",
            "domains.not_kept": "not checked yet: run a check",
            "domains.last_at": "{state} ({when})",
            "domains.purpose.dkim": "DKIM key {selector} ({algorithm}, {state})",
            "domains.purpose.spf": "SPF (suggested)",
            "domains.purpose.dmarc": "DMARC (suggested)",
            "domains.check": "Run a check now",
            "domains.check_hint": (
                "Looks each record up in DNS through this server's resolver. A DKIM key the check finds missing "
                "or different stops signing until a later check finds it published."
            ),
            "domains.check_admin": "An admin of your tenant can run a DNS check.",
            "domains.checked": "DNS check done: see the column “This check”.",
            "domains.zone": "The same records in zone-file syntax",
            "domains.zone_hint": "Long values are split into strings of 255 characters, as DNS needs.",
            "domains.keys": "DKIM keys",
            "domains.keys_hint": (
                "A new key is pending until DNS shows it, then active (it signs); the key it replaces stays "
                "published on standby for a while, then is retired."
            ),
            "domains.selector": "Selector",
            "domains.algorithm": "Algorithm",
            "domains.state": "State",
            "domains.dns_state": "In DNS",
            "domains.created": "Created",
            "domains.changed": "Changed",
            "domains.key.pending": "pending",
            "domains.key.active": "active",
            "domains.key.standby": "standby",
            "domains.key.retired": "retired",
            "domains.dns.unchecked": "not checked yet",
            "domains.dns.published": "published",
            "domains.dns.missing": "missing",
            "domains.dns.mismatch": "mismatch",
            "domains.dns.differs": "differs",
        },
        "ja": {
            "domains.title": "ドメイン",
            "domains.intro": "このテナントが送信に使うドメインと、それぞれに必要な DNS レコードです。",
            "domains.operator": (
                "ドメインの追加と DKIM 鍵のローテーションは運用者が行います（cmcctl domain add、"
                "cmcctl domain dkim-rotate）。「運用者へのお問い合わせ」から依頼してください。"
            ),
            "domains.name": "ドメイン",
            "domains.signing": "署名中の鍵",
            "domains.unpublished": "DNS で未確認の鍵",
            "domains.none": "ドメインはまだありません。運用者に追加を依頼してください。",
            "domains.records": "公開する DNS レコード",
            "domains.records_hint": (
                "各値を、その名前の TXT レコードとして公開してください。SPF と DMARC は推奨値です。"
                "既存のレコードがあれば統合してください。"
            ),
            "domains.purpose": "用途",
            "domains.type": "種類",
            "domains.record_name": "名前",
            "domains.value": "値",
            "domains.last": "前回の確認",
            "domains.now": "今回の確認",
            "domains.found": "検出",
            "domains.not_kept": "未確認（確認を実行してください）",
            "domains.last_at": "{state}（{when}）",
            "domains.purpose.dkim": "DKIM 鍵 {selector}（{algorithm}、{state}）",
            "domains.purpose.spf": "SPF（推奨値）",
            "domains.purpose.dmarc": "DMARC（推奨値）",
            "domains.check": "今すぐ確認",
            "domains.check_hint": (
                "このサーバーのリゾルバーで各レコードを DNS から引きます。見つからない、または内容が異なる DKIM 鍵は、"
                "後の確認で公開済みと分かるまで署名に使われません。"
            ),
            "domains.check_admin": "DNS の確認はテナントの管理者が実行できます。",
            "domains.checked": "DNS を確認しました。「今回の確認」の列をご覧ください。",
            "domains.zone": "ゾーンファイル形式のレコード",
            "domains.zone_hint": "長い値は DNS の仕様どおり 255 文字ずつの文字列に分けてあります。",
            "domains.keys": "DKIM 鍵",
            "domains.keys_hint": (
                "新しい鍵は DNS で確認されるまで保留、その後有効（署名に使用）になります。置き換えられた鍵は"
                "しばらく待機として公開されたのち、廃止されます。"
            ),
            "domains.selector": "セレクター",
            "domains.algorithm": "アルゴリズム",
            "domains.state": "状態",
            "domains.dns_state": "DNS",
            "domains.created": "作成",
            "domains.changed": "変更",
            "domains.key.pending": "保留",
            "domains.key.active": "有効",
            "domains.key.standby": "待機",
            "domains.key.retired": "廃止",
            "domains.dns.unchecked": "未確認",
            "domains.dns.published": "公開済み",
            "domains.dns.missing": "見つからない",
            "domains.dns.mismatch": "不一致",
            "domains.dns.differs": "相違あり",
        },
    }
)
