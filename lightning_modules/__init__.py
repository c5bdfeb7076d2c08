"""The headprune model (plain PyTorch) and the LightningModule that trains it."""
