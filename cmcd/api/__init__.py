"""The HTTP door: the tenant API under /v1/ and its console on aiohttp, behind a front door that caps
and times every connection, and the client that posts mail events to tenants' webhooks.

It maps HTTP to tenancy commands and to submit/, and typed refusals to RFC 9457 problems; it
decides no rule itself, speaks no SMTP, and never imports smtp/ or deliver/.
"""
