"""Delivery: routes and MX lookup, one ready queue and connection pool per destination site, and
cmcd's own SMTP client; it takes due recipients from the scheduler and gives back exactly one
result for each, which queue/ writes.

It never accepts mail, never changes tenancy state, and never imports smtp/ or api/.
"""
