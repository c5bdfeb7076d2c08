"""The ``headprune`` command: a LightningCLI over LanguageModel and WikiTextDataModule (fit/validate/test/predict).

User errors (bad paths or values, a checkpoint that is unsafe, truncated or does not fit, data problems) end the
command with one line, ``headprune: error: <what and how to fix it>``, and exit status 2, before anything is
written; ``HEADPRUNE_DEBUG=1`` shows their traceback (docs/cli-errors.md).
"""

from __future__ import annotations

import logging
import re
import sys
import warnings
from typing import Any

from jsonargparse import ArgumentError
from lightning_fabric.utilities.exceptions import MisconfigurationException
from pytorch_lightning import Trainer
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.plugins.io import CheckpointIO

from callbacks.preemption import Preemption
from datamodules.wikitext import WikiTextDataModule
from lightning_modules.errors import UsageError, debug_enabled, one_line
from lightning_modules.training.checkpoint_io import AtomicCheckpointIO
from lightning_modules.training.checkpoint_layout import CHECKPOINT_KEY, check_compatible, read_checkpoint
from lightning_modules.training.cpu_allocator import ALLOCATOR_MODES, configure_cpu_allocator
from lightning_modules.training.language_model import LanguageModel
from lightning_modules.training.throughput import TokenThroughput

SUBCOMMANDS = ("fit", "validate", "test", "predict")
# errors that are the user's to fix: reported on one line with exit status 2 (anything else is a bug: traceback)
USER_ERRORS = (UsageError, ArgumentError, MisconfigurationException)
# errors the model, data and callback constructors raise for bad settings or data (instantiation has no bugs to hide
# behind them that HEADPRUNE_DEBUG=1 would not show)
CONFIG_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, ConnectionError)
# --ckpt_path values Lightning resolves itself (to a file it then loads through AtomicCheckpointIO)
CKPT_ALIASES = ("last", "best", "hpc", "registry")


def _local_file(path: str | None) -> bool:
    """Whether a checkpoint option names a local file the CLI can check now (not unset, an alias, or remote)."""
    return bool(path) and path not in CKPT_ALIASES and "://" not in str(path)


class HeadpruneCLI(LightningCLI):
    """LightningCLI whose model is sized by the data (the vocabulary size comes from the datamodule) and whose
    checkpoints are written atomically unless the config names its own CheckpointIO plugin. ``--cpu_allocator``
    (``retain`` by default) keeps freed CPU memory in the process, see ``lightning_modules.training.cpu_allocator``."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.vocab_size", "model.model.init_args.vocab_size", apply_on="instantiate")
        parser.add_argument("--cpu_allocator", choices=ALLOCATOR_MODES, default="retain",
                            help="retain: keep freed CPU memory for reuse (saves page faults on every step); "
                                 "default: leave glibc's allocator as it is")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        self._check_files()

    def _check_files(self) -> None:
        """Read the checkpoints the command names (``--ckpt_path``, ``--model.init_from``) with the safe loader, so
        a missing, unsafe or truncated file is a one-line error before Lightning or the model touch it."""
        config = self.config[self.config.subcommand] if self.config.get("subcommand") else self.config
        if config.get("weights_only") is False:
            raise UsageError("--weights_only=false is refused: headprune loads checkpoints with weights_only=true "
                             "only, so a checkpoint cannot run code; drop the option")
        if _local_file(config.get("ckpt_path")):
            read_checkpoint(config.get("ckpt_path"))
        init_from = config.get("model", {}).get("init_from") if self.config.get("subcommand") == "fit" else None
        if _local_file(init_from):
            try:
                read_checkpoint(init_from)
            except UsageError as error:
                raise type(error)(f"--model.init_from: {error}") from error

    def _parse_ckpt_path(self) -> None:
        """Keep the settings the command gives. LightningCLI would overwrite the module's settings with the
        hyperparameters saved in ``--ckpt_path`` (so ``predict --model.temperature=0`` would sample at the
        temperature saved in training). Here the config files and flags are the one source of the settings; the
        checkpoint supplies the weights, and ``_check_checkpoint`` rejects one that does not fit the model."""

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        configure_cpu_allocator(config.get("cpu_allocator", "retain"))

    def instantiate_classes(self) -> None:
        """Instantiate the model, data and trainer; a constructor's complaint about a setting or the data becomes
        a :class:`UsageError` (nothing has run or been written yet)."""
        try:
            super().instantiate_classes()
        except UsageError:
            raise
        except CONFIG_ERRORS as error:
            raise UsageError(one_line(error)) from error

    def before_fit(self) -> None:
        self._check_checkpoint()

    def before_validate(self) -> None:
        self._check_checkpoint()

    def before_test(self) -> None:
        self._check_checkpoint()

    def before_predict(self) -> None:
        self._check_checkpoint()

    def _check_checkpoint(self) -> None:
        """Reject a ``--ckpt_path`` or ``--model.init_from`` that does not fit the configured model before anything
        runs or is written."""
        paths = {"--ckpt_path": self.config[self.subcommand].get("ckpt_path")}
        if self.subcommand == "fit":
            paths["--model.init_from"] = self.model.init_from
        for option, path in paths.items():
            if not _local_file(path):
                continue  # resolved by Lightning later; remote paths are checked when loaded
            record = read_checkpoint(path).get(CHECKPOINT_KEY)
            if record is not None:
                check_compatible(self.model.model, record, f"{option} checkpoint {path}")
        if self.subcommand != "fit":
            # a checkpoint carries its own head layout, so the callbacks that trained it (HeadPruning, the
            # checkpointing) are not needed to evaluate it, as Lightning's warning would suggest
            warnings.filterwarnings("ignore", message=r"Be aware that when using `ckpt_path`, callbacks used to "
                                    r"create the checkpoint need to be provided")

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        plugins = self._get(self.config_init, "trainer", default={}).get("plugins")
        plugins = [] if plugins is None else list(plugins) if isinstance(plugins, list) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            kwargs["plugins"] = [*plugins, AtomicCheckpointIO()]
        return super().instantiate_trainer(**kwargs)


class _DropMessages(logging.Filter):
    """Drops log records whose message starts with one of ``prefixes``."""

    def __init__(self, *prefixes: str) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


_LOG_FILTERS = {
    # an advertisement for Lightning's hosted logger, not a diagnostic
    "pytorch_lightning.utilities.rank_zero": _DropMessages("💡 Tip:"),
    # every full checkpoint (ModelCheckpoint, HeadPruning's pruned.ckpt) is meant to be full
    "pytorch_lightning.trainer.connectors.checkpoint_connector": _DropMessages("`weights_only` was not set"),
}


def silence_false_alarms() -> None:
    """Silence the messages of Lightning that do not apply to headprune runs (real warnings stay); idempotent."""
    for logger, drop in _LOG_FILTERS.items():
        logging.getLogger(logger).addFilter(drop)  # added once: addFilter skips a filter already there
    # the ordered loaders run without worker processes, so the num_workers > 1 caveat does not apply
    warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")
    # a resumed run writes into a new version folder, so its checkpoint folder always differs from the one the
    # checkpoint recorded; the best model path is still restored
    warnings.filterwarnings("ignore", message=r"The dirpath has changed from .* therefore `best_model_score`")
    # CSV (and wandb) are the loggers this project configures; TensorBoard is not one of its dependencies
    warnings.filterwarnings("ignore", message=r"Starting from v1\.9\.0, `tensorboardX` has been removed")
    # the experiment drivers run commands in their own process, whose sys.argv holds the driver's options
    warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended to run from within Python")
    # Lightning's own use of a torch API torch has deprecated; nothing a headprune user can change
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


def run(args: list[str] | None = None, exit_on_error: bool = True) -> HeadpruneCLI:
    """Runs one CLI command (``args`` as on the command line; ``None`` reads ``sys.argv``) and returns the CLI.

    User errors raise :class:`UsageError` (a ValueError); with ``exit_on_error=False`` an argument the parser
    rejects raises jsonargparse's ``ArgumentError`` instead of printing the usage and exiting."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    silence_false_alarms()
    parser_kwargs: dict[str, Any] = {"exit_on_error": exit_on_error}
    parser_kwargs |= {name: {"exit_on_error": exit_on_error} for name in SUBCOMMANDS}
    return HeadpruneCLI(LanguageModel, WikiTextDataModule, args=args, save_config_kwargs={"overwrite": True},
                        trainer_defaults={"callbacks": [Preemption(), TokenThroughput()]}, parser_kwargs=parser_kwargs)


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``headprune`` console script: exit status 0 on success, 2 with a one-line
    ``headprune: error: ...`` on stderr for a user error (``HEADPRUNE_DEBUG=1``: raise it with its traceback)."""
    try:
        run(args, exit_on_error=False)
    except USER_ERRORS as error:
        if debug_enabled():
            raise
        message = error.message if isinstance(error, ArgumentError) else str(error)
        sys.stderr.write(f"headprune: error: {_essential(message)}\n")
        sys.exit(2)


def _essential(message: str) -> str:
    """One line of ``message``: for jsonargparse's report on a value no alternative of a union type accepted,
    the first alternative's error (the class the config names), without the dump of the given value."""
    text = one_line(message)
    first = re.search(r"Does not validate against any of the Union subtypes .*? Errors: - (.+?) - ", text)
    if first:
        text = first.group(1)
    return text.split(" Given value type:")[0]


if __name__ == "__main__":
    main()
