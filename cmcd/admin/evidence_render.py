"""Renders the evidence report (the `evidence` verb's result) as Markdown, JSON or one HTML page; no I/O.

Every value is the daemon's and may hold what a tenant chose (a login, a key id): Markdown cells
have their control characters escaped and markup characters quoted; HTML has everything
escaped, and the page is self-contained (inline style, no script, nothing fetched).
"""

from __future__ import annotations

import html
import json
from typing import Any

from cmcd.textout import escape_controls

FORMATS = ("md", "json", "html")
_MARK = {"ok": "ok", "attention": "ATTENTION", "fail": "FAIL"}


def render(report: dict[str, Any], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(report, indent=2)
    if fmt == "html":
        return render_html(report)
    return render_md(report)


def _by_control(report: dict[str, Any]) -> list[tuple[str, str, list[dict[str, Any]]]]:
    controls: dict[str, str] = report.get("controls") or {}
    out = []
    for control, title in controls.items():
        lines = [line for line in report.get("lines", []) if line.get("control") == control]
        out.append((control, title, lines))
    return out


def _scope(report: dict[str, Any]) -> str:
    return f"tenant {report['tenant']}" if report.get("tenant") else "all tenants"


def _md_cell(value: Any) -> str:
    text = escape_controls(str(value).replace("\\", "\\\\"))
    for ch in "|<>`*[]":  # CommonMark: a backslash before punctuation makes it literal (no HTML, no markup)
        text = text.replace(ch, "\\" + ch)
    return text or "-"


def render_md(report: dict[str, Any]) -> str:
    s = report.get("summary", {})
    asked = report.get("asked_by") or {}
    out = [
        f"# cmcd evidence report: {_md_cell(report.get('hostname', ''))}",
        "",
        f"- generated: {report.get('generated_iso', '')} (times in UTC; server.timezone "
        f"{_md_cell(report.get('timezone', ''))})",
        f"- scope: {_md_cell(_scope(report))}",
        f"- asked by: {_md_cell(asked.get('name', '-'))} (uid {asked.get('uid', '-')}); this run is in the operation log",
        f"- result: {s.get('ok', 0)} ok, {s.get('attention', 0)} attention, {s.get('fail', 0)} fail",
        "",
    ]
    for control, title, lines in _by_control(report):
        out += [f"## {control} {_md_cell(title)}", ""]
        if not lines:
            out += ["No line measured for this control.", ""]
            continue
        out += ["| Item | Setting | Evidence | Status | Reason |", "| --- | --- | --- | --- | --- |"]
        for line in lines:
            cells = [line.get(k, "") for k in ("item", "setting", "evidence")]
            status = _MARK.get(str(line.get("status")), str(line.get("status")))
            out.append("| " + " | ".join(_md_cell(c) for c in [*cells, status, line.get("reason", "")]) + " |")
        out.append("")
    return "\n".join(out)


_STYLE = (
    "body{font-family:sans-serif;margin:2em;color:#222}table{border-collapse:collapse;width:100%;margin-bottom:1.5em}"
    "th,td{border:1px solid #bbb;padding:4px 8px;text-align:left;vertical-align:top;font-size:90%}"
    "th{background:#eee}.ok{background:#e3f4e3}.attention{background:#fff3cd}.fail{background:#f8d7da}"
)


def render_html(report: dict[str, Any]) -> str:
    e = html.escape
    s = report.get("summary", {})
    asked = report.get("asked_by") or {}
    host = e(str(report.get("hostname", "")))
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>cmcd evidence report: {host}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>cmcd evidence report: {host}</h1>",
        "<ul>",
        f"<li>generated: {e(str(report.get('generated_iso', '')))} (times in UTC; server.timezone "
        f"{e(str(report.get('timezone', '')))})</li>",
        f"<li>scope: {e(_scope(report))}</li>",
        f"<li>asked by: {e(str(asked.get('name', '-')))} (uid {e(str(asked.get('uid', '-')))}); "
        "this run is in the operation log</li>",
        f"<li>result: {int(s.get('ok', 0))} ok, {int(s.get('attention', 0))} attention, {int(s.get('fail', 0))} fail</li>",
        "</ul>",
    ]
    for control, title, lines in _by_control(report):
        out.append(f'<h2 id="{e(control)}">{e(control)} {e(title)}</h2>')
        if not lines:
            out.append("<p>No line measured for this control.</p>")
            continue
        out.append("<table><tr><th>Item</th><th>Setting</th><th>Evidence</th><th>Status</th><th>Reason</th></tr>")
        for line in lines:
            status = str(line.get("status", ""))
            css = status if status in _MARK else ""
            cells = "".join(f"<td>{e(str(line.get(k, '')))}</td>" for k in ("item", "setting", "evidence"))
            out.append(
                f'<tr class="{css}">{cells}<td>{e(_MARK.get(status, status))}</td>'
                f"<td>{e(str(line.get('reason', '')))}</td></tr>"
            )
        out.append("</table>")
    out.append("</body></html>")
    return "\n".join(out)
