"""WikiText data for headprune: vocabulary, token-id caches and Transformer-XL ordered batches."""
