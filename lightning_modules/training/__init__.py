"""The Lightning side: the LightningModule that trains a MemoryTransformerLM, its optimizers and schedules, the
checkpoint layout record and atomic checkpoint writes, and the CPU allocator setting of the training process."""
