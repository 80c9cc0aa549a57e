"""``python -m kairos_core`` runs the ``kairos`` command."""

from .cli import main

main()
