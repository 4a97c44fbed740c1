"""The ``sdlit`` command: ``sdlit fit|validate|test`` through LightningCLI, configured by YAML, and
``sdlit analyze`` (per-token advantage figures and tables, :mod:`sdlit.analyze`)."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint
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

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """fit, validate and test (the module has no predict step)."""
        commands = dict(LightningCLI.subcommands())
        commands.pop("predict", None)
        return commands

    def _add_subcommands(self, parser, **kwargs) -> None:
        """LightningCLI's subcommands, plus ``analyze`` in the listing (``main`` runs it: :mod:`sdlit.analyze`)."""
        super()._add_subcommands(parser, **kwargs)
        description = "Per-token advantages of rollouts under several teacher contexts: figures, tables, heatmaps"
        analyze = self.init_parser(description=description + " (sdlit analyze --help)")
        parser._subcommands_action.add_subcommand("analyze", analyze, help=description)

    def parse_arguments(self, parser, args) -> None:
        """Parse as LightningCLI does, then put outputs without a directory of their own under
        ``trainer.default_root_dir`` (:func:`follow_root_dir`) before the config is validated."""
        if isinstance(args, (dict, Namespace)):
            return super().parse_arguments(parser, args)
        moved = moved_settings(sys.argv[1:] if args is None else list(args))
        if moved:
            parser.error("settings that moved: " + "; ".join(moved))
        config = parser.parse_args(args, _skip_validation=True)
        subcommand = config.get("subcommand")
        follow_root_dir((config[subcommand] if subcommand else config).trainer)
        parser.validate(config)
        self.config = config

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


# flat datamodule keys of earlier versions -> their key in a settings group (sdlit.settings)
MOVED_DATA_KEYS = {
    "temperature": "sampling.temperature", "top_p": "sampling.top_p", "max_new_tokens": "sampling.max_new_tokens",
    "eval_k": "evaluation.k", "eval_temperature": "evaluation.temperature",
    "eval_max_new_tokens": "evaluation.max_new_tokens", "eval_batch_size": "evaluation.batch_size",
    "eval_size": "evaluation.num_problems",
}


def moved_settings(words: list[str]) -> list[str]:
    """``data.X is now data.Y`` for every moved datamodule key given as a flag or in a ``--config`` file."""
    given = []
    for i, word in enumerate(words):
        flag = word.split("=", 1)[0]
        if flag.startswith("--data."):
            given.append(flag.removeprefix("--data.").removeprefix("init_args."))
        if flag in ("--config", "-c") and i + 1 < len(words) and Path(words[i + 1]).is_file():
            given += _data_keys(Path(words[i + 1]))
        elif flag == "--config" and "=" in word and Path(word.split("=", 1)[1]).is_file():
            given += _data_keys(Path(word.split("=", 1)[1]))
    return [f"data.{key} is now data.{MOVED_DATA_KEYS[key]}" for key in dict.fromkeys(given) if key in MOVED_DATA_KEYS]


def _data_keys(path: Path) -> list[str]:
    """The datamodule's keys in a YAML config (its ``data`` or ``data.init_args``); none if it is not such a file."""
    import yaml

    try:
        data = (yaml.safe_load(path.read_text()) or {}).get("data")
    except (yaml.YAMLError, AttributeError, UnicodeDecodeError):
        return []
    settings = data.get("init_args", data) if isinstance(data, dict) else None
    return list(settings) if isinstance(settings, dict) else []


def follow_root_dir(trainer: Namespace) -> None:
    """A config names its run directory once, ``trainer.default_root_dir`` (default: the working directory).

    A logger whose ``save_dir`` is left null writes there, and a ``ModelCheckpoint`` whose ``dirpath`` is left null
    writes to ``<default_root_dir>/checkpoints`` (``HFExport`` defaults to ``<default_root_dir>/hf`` itself), so
    ``--trainer.default_root_dir runs/mine`` moves every output of the run. Directories given explicitly are kept.
    """
    root = Path(trainer.get("default_root_dir") or os.getcwd())
    for logger in _entries(trainer.get("logger")):
        if "save_dir" in logger.init_args and logger.init_args.save_dir is None:
            logger.init_args.save_dir = str(root)
    for callback in _entries(trainer.get("callbacks")):
        if _is_subclass(callback.class_path, ModelCheckpoint) and callback.init_args.get("dirpath") is None:
            callback.init_args.dirpath = str(root / "checkpoints")


def _entries(value) -> list[Namespace]:
    """The class_path/init_args entries of a config value that is one entry, a list of them, or anything else."""
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, Namespace) and "class_path" in v and v.get("init_args") is not None]


def _is_subclass(class_path: str, base: type) -> bool:
    module, _, name = class_path.rpartition(".")
    try:
        return issubclass(getattr(importlib.import_module(module), name), base)
    except (ImportError, AttributeError, TypeError):
        return False


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
