"""The ``headprune`` command: a LightningCLI over LanguageModel and WikiTextDataModule (fit/validate/test/predict)."""

from __future__ import annotations

import logging
from typing import Any

from pytorch_lightning import Trainer
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.plugins.io import CheckpointIO

from callbacks.preemption import Preemption
from datamodules.wikitext import WikiTextDataModule
from lightning_modules.training.checkpoint_io import AtomicCheckpointIO
from lightning_modules.training.checkpoint_layout import CHECKPOINT_KEY, check_compatible, read_checkpoint
from lightning_modules.training.cpu_allocator import ALLOCATOR_MODES, configure_cpu_allocator
from lightning_modules.training.language_model import LanguageModel


class HeadpruneCLI(LightningCLI):
    """LightningCLI whose model is sized by the data (the vocabulary size comes from the datamodule) and whose
    checkpoints are written atomically unless the config names its own CheckpointIO plugin. ``--cpu_allocator``
    (``retain`` by default) keeps freed CPU memory in the process, see ``lightning_modules.training.cpu_allocator``."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.vocab_size", "model.model.init_args.vocab_size", apply_on="instantiate")
        parser.add_argument("--cpu_allocator", choices=ALLOCATOR_MODES, default="retain",
                            help="retain: keep freed CPU memory for reuse (saves page faults on every step); "
                                 "default: leave glibc's allocator as it is")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        configure_cpu_allocator(config.get("cpu_allocator", "retain"))

    def before_fit(self) -> None:
        self._check_checkpoint()

    def before_validate(self) -> None:
        self._check_checkpoint()

    def before_test(self) -> None:
        self._check_checkpoint()

    def before_predict(self) -> None:
        self._check_checkpoint()

    def _check_checkpoint(self) -> None:
        """Reject a ``--ckpt_path`` that does not fit the configured model before anything runs or is written."""
        path = self.config[self.subcommand].get("ckpt_path")
        if not path or path in ("last", "best", "hpc", "registry") or "://" in str(path):
            return  # resolved by Lightning later; remote paths are checked when loaded
        record = read_checkpoint(path).get(CHECKPOINT_KEY)
        if record is not None:
            check_compatible(self.model.model, record, f"checkpoint {path}")

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        plugins = self._get(self.config_init, "trainer", default={}).get("plugins")
        plugins = [] if plugins is None else list(plugins) if isinstance(plugins, list) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            kwargs["plugins"] = [*plugins, AtomicCheckpointIO()]
        return super().instantiate_trainer(**kwargs)


def run(args: list[str] | None = None) -> HeadpruneCLI:
    """Runs one CLI command (``args`` as on the command line; ``None`` reads ``sys.argv``) and returns the CLI."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return HeadpruneCLI(LanguageModel, WikiTextDataModule, args=args, save_config_kwargs={"overwrite": True},
                        trainer_defaults={"callbacks": [Preemption()]})


def main() -> None:
    """Entry point of the ``headprune`` console script (its exit status is 0 on success)."""
    run()


if __name__ == "__main__":
    main()
