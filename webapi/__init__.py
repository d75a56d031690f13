"""The Retail Pulse HTTP API: a Bottle app over the spool, served by gunicorn."""
