"""kvframe plugin: optimizers, lr schedulers and the updater."""
