"""Run one of the seed paper's studies on a local federation and write its report folder.

    python -m scripts.study mnist-vae [--quick] [--out reports/mnist-vae]
    python -m scripts.study brain [--quick] [--out reports/brain]

Full size by default (the paper's settings; hours on a 2-core machine for mnist-vae);
--quick runs a small version in about a minute. The folder gets the figures as PNG (fig3 weight
norms, fig4 latent space, fig5 round times), the metrics as CSV, and the job's own results.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from common.logging import configure_logging

console = Console(soft_wrap=True)


@click.command(context_settings={"help_option_names": ["-h", "--help"]}, help=__doc__)
@click.argument("study", type=click.Choice(["mnist-vae", "brain"]))
@click.option("--quick", is_flag=True, help="A small version (CI runs it): fewer centres/rounds/epochs.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Report folder (default: reports/STUDY[-quick]).")
@click.option("--rounds", type=int, default=None, help="Override the number of rounds.")
@click.option("--epochs", type=int, default=None, help="Override the local epochs per round.")
@click.option("--centres", type=int, default=None, help="mnist-vae: override the number of centres.")
def main(study: str, quick: bool, out: Path | None, rounds: int | None, epochs: int | None, centres: int | None) -> None:
    import dataclasses

    configure_logging("warning")
    out = out or Path("reports") / (study + ("-quick" if quick else ""))
    if study == "mnist-vae":
        from scripts.studies import mnist_vae as module
    else:
        from scripts.studies import brain as module
    cfg = module.Config.quick() if quick else module.Config()
    overrides = {k: v for k, v in {"rounds": rounds, "epochs": epochs, "centres": centres}.items() if v is not None}
    if "centres" in overrides and study != "mnist-vae":
        raise click.UsageError("--centres applies to mnist-vae only (the brain study has the paper's 4 centres)")
    cfg = dataclasses.replace(cfg, **overrides)
    console.print(f"[bold]{study}[/bold] ({'quick' if quick else 'full'}): {cfg}")
    summary = module.run(out, cfg)
    table = Table("metric", "value")
    for key, value in summary.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)
    console.print(f"report: {out.resolve()}")


if __name__ == "__main__":
    sys.exit(main())
