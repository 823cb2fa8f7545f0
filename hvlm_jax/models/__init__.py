"""Model code: attention family, token merging, domain modules, encoder, heads, model."""
