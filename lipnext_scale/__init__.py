"""lipnext_scale: train and certify LipNeXt 1-Lipschitz networks, from CIFAR to 2B parameters."""

__version__ = "0.1.0"
