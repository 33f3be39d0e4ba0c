"""unlearnd: inference-time unlearning serving layer."""
