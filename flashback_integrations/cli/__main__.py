"""``python -m flashback_integrations.cli`` where no virtualenv script exists."""

from . import main

main()
