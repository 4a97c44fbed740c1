"""The ``sdlit`` command: ``sdlit fit|validate|test`` through LightningCLI, configured by YAML, and
``sdlit analyze`` (per-token advantage figures and tables, :mod:`sdlit.analysis.analyze`)."""

from __future__ import annotations

import sys

from lightning.pytorch.cli import LightningCLI

import sdlit.callbacks  # noqa: F401  (registers the shipped callbacks for short class names in YAML)
import sdlit.critics  # noqa: F401
import sdlit.tasks  # noqa: F401
from sdlit.data import RolloutDataModule
from sdlit.module import SelfDistillationModule


class SdlitCLI(LightningCLI):
    """LightningCLI with sdlit's module and datamodule as defaults (any subclass may replace them)."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults(
            {
                "model": {"class_path": "sdlit.module.SelfDistillationModule"},
                "data": {"class_path": "sdlit.data.RolloutDataModule"},
            }
        )


def run_cli(args: list[str] | None = None) -> SdlitCLI:
    """Run ``sdlit`` with ``args`` (default ``sys.argv[1:]``) and return the CLI, whose ``trainer``, ``model``
    and ``datamodule`` stay inspectable (for tests and notebooks)."""
    return SdlitCLI(
        SelfDistillationModule,
        RolloutDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``sdlit`` script; ``args`` replaces ``sys.argv[1:]``.

    ``sdlit analyze ...`` runs the advantage analysis; anything else goes to LightningCLI.
    """
    args = sys.argv[1:] if args is None else list(args)
    if args and args[0] == "analyze":
        from sdlit.analysis.analyze import analyze_cli

        analyze_cli(args[1:])
        return
    run_cli(args)


if __name__ == "__main__":
    main()
