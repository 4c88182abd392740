"""Networks: backbones, necks, heads and losses, built by name from registries."""
