"""gunicorn entry point: ``gunicorn web.wsgi:app`` (the daemon sets BOOTBACK_STATE)."""

from web import create_app

app = create_app()
