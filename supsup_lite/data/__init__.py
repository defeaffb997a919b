"""Task streams held as tensors on the device: the MNIST family, SplitCIFAR100, and the unshared-label view."""
from .mnist import (Batch, DataNotFoundError, PermutedMNIST, RotatedMNIST, SplitMNIST, TaskStream, load_mnist,
                    rotate_images)
from .unshared import UnsharedLabels

__all__ = ["Batch", "DataNotFoundError", "PermutedMNIST", "RotatedMNIST", "SplitMNIST", "TaskStream",
           "UnsharedLabels", "load_mnist", "rotate_images"]
