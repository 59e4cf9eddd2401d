"""``python -m data_pipelines``: see :mod:`data_pipelines.cli`."""

from data_pipelines.cli import main

if __name__ == "__main__":
    raise SystemExit(main(prog="python -m data_pipelines"))
