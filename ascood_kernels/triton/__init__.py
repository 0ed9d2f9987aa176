"""Triton backend of ascood_kernels: ops in the ``ascood_triton`` namespace.

Importing this package registers every op (same names, arguments and returns
as the C++ ``ascood`` namespace, csrc/ops.cpp). Kernels run on CUDA tensors, or
on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1`` set before
``import triton``), which is how CI tests them. See ``_common`` for the
registration pattern.
"""
from . import _common  # noqa: F401
from . import outlier  # noqa: F401  invariant_mask, gradient_outlier
from . import zscore  # noqa: F401  zscore, zscore_backward
from . import shuffle_outlier  # noqa: F401
from . import iodin_perturb  # noqa: F401
from . import ascood_loss  # noqa: F401  ascood_loss, ascood_loss_backward
