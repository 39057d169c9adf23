"""Who may use the appliance: admin logins, API tokens and login sessions, kept in STATE/web/.

Storage only, no HTTP: the web app (``web``) checks requests against it, and the CLI (``bootback token``,
``bootback password``) manages it without starting Flask."""
