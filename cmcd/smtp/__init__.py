"""The SMTP door: aiosmtpd listeners on the submission (STARTTLS) and implicit-TLS ports, their
sessions, AUTH, connection caps and timers.

It speaks SMTP and asks submit/ for every decision, relaying its replies; it holds no rule of
its own, touches neither the store nor the spool, and never imports api/ or deliver/.
"""
