#!/usr/bin/env python
"""LightningCLI entry point: ``python train.py fit|validate|test|predict --config CONFIG``."""

from sambridge.cli import main

if __name__ == "__main__":
    main()
