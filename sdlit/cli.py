"""The ``sdlit`` command: ``sdlit fit|validate|test`` through LightningCLI, configured by YAML, and
``sdlit analyze`` (per-token advantage figures and tables, :mod:`sdlit.analyze`)."""

from __future__ import annotations

import sys

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO

import sdlit.callbacks  # noqa: F401  (registers the shipped callbacks for short class names in YAML)
import sdlit.critics  # noqa: F401
import sdlit.tasks  # noqa: F401
from sdlit.checkpointing import AtomicCheckpointIO
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

    def instantiate_trainer(self, **kwargs):
        """The trainer, writing checkpoints atomically (:class:`AtomicCheckpointIO`) unless the config gives
        its own checkpoint plugin; other plugins are kept."""
        if "plugins" not in kwargs:
            configured = self._get(self.config_init, "trainer", default={}).get("plugins")
            kwargs["plugins"] = with_atomic_checkpoints(configured)
        return super().instantiate_trainer(**kwargs)


def with_atomic_checkpoints(plugins) -> list:
    """``plugins`` (None, one or a list) plus an :class:`AtomicCheckpointIO` if none of them is a CheckpointIO."""
    plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    return plugins


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
    words = sys.argv[1:] if args is None else list(args)
    if words and words[0] == "analyze":
        from sdlit.analyze import analyze_cli

        analyze_cli(words[1:])
        return
    run_cli(args)  # None: LightningCLI reads sys.argv itself (no "args and sys.argv both given" warning)


if __name__ == "__main__":
    main()
