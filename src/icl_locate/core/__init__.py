"""The science core: prompts, masking conditions, interventions, the attention hooks, models."""
