"""The durable spool and what runs on it: message bodies and one row per recipient in SQLite with
group commit, the scheduler of due recipients, results applied with their bounces and body
erasure in one transaction, delivery status notifications, the outbox of log rows and daily
counts for the store, and API requests' Idempotency-Keys (committed with the messages they queued).

SQL about the queue lives here and nowhere else: other packages use Spool's named operations and
never get a connection. It never speaks SMTP or HTTP and never decides who may send what
(submit/) or where mail goes (deliver/).
"""
