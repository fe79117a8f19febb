"""The Crane / Crane+ model: CLIP loading, E-Attn / D-Attn vision path, prompts, head."""
