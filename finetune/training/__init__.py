"""The training loop's parts: the one LightningModule (`module`), the methods that decide what trains
(`methods/`: LoRA, full, ControlNet), losses, optimizers, the non-finite-step guard, the loop's
callbacks, loggers, and the whole-config checks run before anything heavy (`checks`)."""
