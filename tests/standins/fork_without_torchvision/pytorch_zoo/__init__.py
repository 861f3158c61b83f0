"""Stand-in for the fork where torchvision is missing: its package __init__ imports torchvision.models."""

import torchvision.models  # noqa: F401
