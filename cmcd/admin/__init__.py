"""The operator's door: the admin Unix socket that cmcctl speaks to (peer credentials, framing, the
operation log, a table of verbs over commands), cmcctl itself, the Prometheus /metrics listener,
backups, retention and evidence reports.

It is a transport and the operator's tools, not a place for rules: tenancy/ changes tenants and
submit/ decides about messages. Nothing imports admin but cmcd/daemon/.
"""
