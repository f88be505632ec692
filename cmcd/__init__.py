"""cmcd: a self-hosted, multi-tenant outbound mail service: authenticated SMTP and HTTP intake, a
durable spool, delivery to the recipients' exchangers, and the records an operator must keep.

Its packages are layers, low to high (DESIGN.md, "Module boundaries"): the base modules here
(config, policy, crypto, records, errors), store, queue, tenancy, submit, then smtp, api and deliver
(which never import each other), admin; cmcd/daemon/ wires them together. No layer imports one
above it.
"""

__version__ = "0.1.0"
