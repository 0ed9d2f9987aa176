"""One module per op: wrapper with validation and dispatch, fake kernel, autograd."""
from .iodin import iodin_perturb
from .loss import ascood_loss
from .outlier import gradient_outlier, invariant_mask
from .shuffle import shuffle_outlier
from .zscore import zscore

__all__ = ["invariant_mask", "gradient_outlier", "zscore", "shuffle_outlier", "iodin_perturb", "ascood_loss"]
