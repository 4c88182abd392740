"""Networks: backbones, necks, heads and losses, built by name from registries.

Importing the package registers every backbone family (as timm does): each family module
registers its own builders in :mod:`visrec.models.registry`, and no family imports another.
"""

from visrec.models import efficientnet_lite, mobilenet_v1, pplcnet_v2, resnet  # noqa: F401  (register their backbones)
