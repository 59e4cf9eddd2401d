"""Command-line entry (placeholder until the LightningCLI lands)."""


def main(args: list[str] | None = None) -> None:
    raise SystemExit("sambridge: not implemented yet")
