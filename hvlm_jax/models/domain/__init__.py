"""Domain specialisation: multi-domain LoRA adapters, domain experts and router."""
