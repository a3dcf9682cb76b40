"""tore-kernels: fused kernels for transformer-based human mesh recovery (TORE, FastMETRO, METRO).

``tore_kernels.patch(model)`` swaps the fast modules into an existing model (``unpatch`` undoes it);
``tore_kernels.ops`` holds the functional ops, ``tore_kernels.nn`` the drop-in modules,
``tore_kernels.topology`` the mesh data loaders.
"""
from . import backend

backend.separate_inductor_cache()  # before the ops' registration settles inductor's cache directory
from . import nn, ops, topology  # noqa: E402
from .patch import PatchReport, patch, patch_report, unpatch  # noqa: E402

__version__ = "0.1.0"
__all__ = ["backend", "nn", "ops", "topology", "patch", "unpatch", "patch_report", "PatchReport", "__version__"]
