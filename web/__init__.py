"""The admin page and REST API on the control port (Flask, served by gunicorn)."""
