"""``python -m saap_cli``: the same commands as the ``saap`` console script."""

from saap_cli import main

main()
