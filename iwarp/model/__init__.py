"""The implicit-warping network: one module per sub-network."""

from iwarp.model.keypoints import Keypoints
from iwarp.model.network import ImplicitWarpingNetwork
from iwarp.model.warp import SourceSet

__all__ = ["ImplicitWarpingNetwork", "Keypoints", "SourceSet"]
