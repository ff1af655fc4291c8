"""``python -m fibroquant`` runs the command line."""

from fibroquant.cli import app

app(prog_name="fibroquant")
