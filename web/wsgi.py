"""gunicorn entry point: ``gunicorn web.wsgi:app`` (the daemon sets BOOTBACK_STATE)."""

from appliance import allocator
from web import create_app

allocator.tune()  # a worker runs backups and file extractions too
app = create_app()
