"""``python -m sambridge``: the same CLI as ``train.py`` and the ``sambridge`` console script."""

from sambridge.cli import main

main()
