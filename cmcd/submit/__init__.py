"""The rules for a message coming in, once for every way in (SMTP and the HTTP API): who may send
as what, limits and quotas, suppressed recipients, header fix-ups and one DKIM signature, then
the hand-off to the spool.

It reads tenants, credentials and suppressions from tenancy's directory and never changes them,
and it speaks no protocol: smtp/ and api/ do.
"""
