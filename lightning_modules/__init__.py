"""The headprune model and its training: ``model`` (plain PyTorch, no Lightning), ``training`` (the
LightningModule and checkpoint handling) and ``cli`` (the ``headprune`` command, the one composition root)."""
