"""Constructors that take other libraries' argument names and state_dict layouts, so that
changing the import is the whole migration:

- ``wavg_ext.compat.timm.ModelEmaV3``: timm's ``timm.utils.ModelEmaV3``;
- ``wavg_ext.compat.diffusers.EMAModel``: diffusers' ``diffusers.training_utils.EMAModel``.

Both run ``wavg_ext.ModelEMA``'s fused update. Neither imports the library it stands in for.
"""

from . import diffusers, timm

__all__ = ["diffusers", "timm"]
