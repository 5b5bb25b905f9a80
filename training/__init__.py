"""GRPO+ training application: data, sandboxed rewards, loss, rollouts, trainer (training issues)."""
