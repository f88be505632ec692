"""The tenant management console: server-rendered HTML pages for a tenant's admins (and read-only
ones for its viewers) at / on the API listener, beside the JSON API under /v1/.

web.py is its plumbing (sessions, CSRF, headers, rendering), i18n.py its words in English and
Japanese, pages.py the list of its pages; each page module maps forms to the same tenancy
commands and store reads the API uses, for the session's tenant only.
"""

from cmcd.api.console.web import Console

__all__ = ["Console"]
