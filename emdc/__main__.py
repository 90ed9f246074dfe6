"""``python -m emdc``: the same as the ``emdc`` command."""

from emdc.cli import main

main()
