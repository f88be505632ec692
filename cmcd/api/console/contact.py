"""Contact the operator: a form (subject and message) any console user of a tenant may send.

The inquiry is recorded in the operation log (action console.contact, the console user as actor,
the subject as detail: the log clips details, so the whole text is only in the mail) and, when
[server] operator_address is set, mailed there as plain text, from that same address (who wrote
it is in the text). The mail is queued in this worker's
spool shard as the daemon queues its own DSNs (null envelope sender, counted against no quota),
under the tenant's id so it is in the tenant's mail log; it never goes through SMTP to ourselves.
Nothing is recorded when the mail cannot be queued: the form comes back with its text.
"""

from __future__ import annotations

import datetime
import email.parser
import logging
import re
import sqlite3

from aiohttp import web

from cmcd.api.compose import ComposeError, compose_one
from cmcd.api.console import i18n
from cmcd.api.console.web import Console, Page, console_actor
from cmcd.api.context import client_ip
from cmcd.errors import SpoolError, StoreError
from cmcd.records import Recipient, SpoolMessage

log = logging.getLogger("cmcd.api.console")

MAX_SUBJECT = 200
#: inquiries a user, and a whole tenant, may send within LIMIT_WINDOW_S
USER_LIMIT, TENANT_LIMIT, LIMIT_WINDOW_S = 5, 20, 3600.0
MAX_MESSAGE = 5000
#: what a one-line subject may not hold: line breaks and other control characters (TAB is fine)
_NOT_ONE_LINE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")


def register(c: Console) -> None:
    c.get("/contact", contact_form)
    c.post("/contact", contact_send, need="read")


async def contact_form(
    page: Page, status: int = 200, error: str = "", subject: str = "", message: str = ""
) -> web.StreamResponse:
    return page.render(
        "contact.html",
        status=status,
        error=error,
        subject=subject,
        message=message,
        mailed=bool(page.api.config.server.operator_address.strip()),
        max_subject=MAX_SUBJECT,
        max_message=MAX_MESSAGE,
    )


def problem(page: Page, subject: str, message: str) -> str:
    """What is wrong with the inquiry ("" when nothing is), in the reader's language."""
    if not subject:
        return page.t("contact.subject_missing")
    if len(subject) > MAX_SUBJECT or _NOT_ONE_LINE.search(subject):
        return page.t("contact.subject_bad", max=MAX_SUBJECT)
    if not message.strip():
        return page.t("contact.message_missing")
    if len(message) > MAX_MESSAGE:
        return page.t("contact.message_long", n=len(message), max=MAX_MESSAGE)
    return ""


async def contact_send(page: Page) -> web.StreamResponse:
    subject = page.form.get("subject", "").strip()
    # a browser sends a textarea's line breaks as CRLF: counted as one character each, as typed
    message = page.form.get("message", "").replace("\r\n", "\n").replace("\r", "\n")
    error = problem(page, subject, message)
    if error:
        return await contact_form(page, 400, error, subject, message)
    api = page.api
    caller = page.caller
    now = api.clock()
    if await _too_many(page, now):
        return await contact_form(page, 429, page.t("contact.too_many", n=USER_LIMIT), subject, message)
    operator = api.config.server.operator_address.strip()
    target = "operator"
    if operator:
        try:
            target = await _mail(page, operator, subject, message, now)
        except (ComposeError, SpoolError) as exc:
            log.error("event=console_contact_not_queued tenant=%s login=%s error=%r", caller.tenant, caller.login,
                      str(exc))  # fmt: skip
            return await contact_form(page, 503, page.t("contact.not_sent"), subject, message)
    await api.service.audit.op(ts=now, actor_uid=None, actor=console_actor(caller), action="console.contact",
                               target=target, result="ok", tenant_id=caller.tenant_id, detail=subject)  # fmt: skip
    log.info("event=console_contact tenant=%s login=%s queue_id=%s", caller.tenant, caller.login,
             target if operator else "-")  # fmt: skip
    return page.redirect("/contact", done="contact_sent")


async def _too_many(page: Page, now: float) -> bool:
    """Whether this inquiry is one too many (USER_LIMIT a user, TENANT_LIMIT a tenant, in LIMIT_WINDOW_S,
    counted in the store for every worker); one that is not is counted now."""
    api = page.api
    caller = page.caller
    limits = [(f"contact user {caller.user_id}", USER_LIMIT), (f"contact tenant {caller.tenant_id}", TENANT_LIMIT)]
    try:
        got = await api.astore.call(api.store.failure_claim, limits, LIMIT_WINDOW_S, now)
    except (sqlite3.Error, StoreError) as exc:  # cannot count: nothing is sent uncounted
        log.warning("event=console_contact_not_counted tenant=%s error=%r", caller.tenant, str(exc))
        return True
    if got.held is not None:
        log.warning("event=console_contact_limited tenant=%s login=%s limit=%s", caller.tenant, caller.login, got.held)
        return True
    return False


def inquiry_text(*, tenant: str, login: str, role: str, when: str, client: str, subject: str, message: str) -> str:
    """The mail's text: who asked, when and from where, then what they wrote."""
    return "\n".join(
        [
            "An inquiry from the cmcd console.",
            "",
            f"Tenant:    {tenant}",
            f"Login:     {login} ({role})",
            f"Time:      {when}",
            f"Client IP: {client}",
            f"Subject:   {subject}",
            "",
            message,
            "",
        ]
    )


async def _mail(page: Page, operator: str, subject: str, message: str, now: float) -> str:
    """Queue the inquiry to OPERATOR in this worker's spool shard; returns its queue id."""
    api = page.api
    caller = page.caller
    utc = datetime.datetime.fromtimestamp(now, datetime.UTC)
    text = inquiry_text(
        tenant=caller.tenant,
        login=caller.login,
        role=caller.role,
        when=f"{page.when(now)} ({utc.strftime('%Y-%m-%d %H:%M:%S')} UTC)",
        client=client_ip(page.request),
        subject=subject,
        message=message,
    )
    composed = compose_one(
        {
            # from the operator's own address: a valid domain whatever server.hostname is (the
            # development one is "localhost"); who wrote it is in the text
            "from": {"email": operator, "name": "cmcd console"},
            "to": [operator],
            "subject": f"[cmcd console] {caller.tenant}: {subject}",
            "text": text,
        },
        max_size=int(api.config.smtp.max_message_size),
        now=utc,
    )
    service = api.service
    queue_id = service.ids.next(now)
    message_id = email.parser.BytesHeaderParser().parsebytes(composed.body).get("Message-ID", "")
    await service.spool.commit_notice(
        SpoolMessage(
            queue_id=queue_id,
            tenant_id=caller.tenant_id,
            user_id=caller.user_id,
            sender="",  # as a DSN's: nothing bounces back to a console user's login
            recipients=tuple(Recipient(r, r.rpartition("@")[2].lower()) for r in composed.rcpts),
            body=composed.body,
            received_ts=now,
            message_id=str(message_id).strip(),
        )
    )
    return queue_id


i18n.add(
    {
        "en": {
            "contact.title": "Contact the operator",
            "contact.intro_mailed": "Your message goes to the operator of this service by mail and is recorded in your "
            "tenant's operation log (the subject only).",
            "contact.intro_recorded": "Inquiries are recorded for the operator only: no mail address is set up for "
            "them, so the subject goes into the operation log, where the operator reads it, and the message is not kept.",
            "contact.subject": "Subject",
            "contact.too_many": "You have sent {n} inquiries within the hour; please wait before sending another.",
            "contact.message": "Message",
            "contact.message_hint": "At most {max} characters.",
            "contact.send": "Send",
            "contact.subject_missing": "Enter a subject.",
            "contact.subject_bad": "The subject must be one line of at most {max} characters.",
            "contact.message_missing": "Enter your message.",
            "contact.message_long": "The message has {n} characters; at most {max} are allowed.",
            "contact.not_sent": "Your message could not be sent now; nothing was recorded. Try again in a moment.",
            "done.contact_sent": "Your message was sent to the operator.",
        },
        "ja": {
            "contact.title": "運用者へのお問い合わせ",
            "contact.intro_mailed": "メッセージはこのサービスの運用者にメールで届き、テナントの操作ログに（件名のみ）記録されます。",
            "contact.intro_recorded": "お問い合わせは運用者向けに記録されるだけです。送信先のメールアドレスが設定されていないため、件名が操作ログに記録され（運用者が確認します）、本文は保存されません。",
            "contact.subject": "件名",
            "contact.too_many": "1 時間以内に {n} 件のお問い合わせを送信済みです。しばらくしてから送信してください。",
            "contact.message": "本文",
            "contact.message_hint": "{max} 文字まで。",
            "contact.send": "送信",
            "contact.subject_missing": "件名を入力してください。",
            "contact.subject_bad": "件名は 1 行、{max} 文字以内にしてください。",
            "contact.message_missing": "本文を入力してください。",
            "contact.message_long": "本文が {n} 文字あります。{max} 文字以内にしてください。",
            "contact.not_sent": "現在メッセージを送信できません。何も記録されていません。しばらくしてからやり直してください。",
            "done.contact_sent": "運用者にメッセージを送信しました。",
        },
    }
)
