"""Process-group seam: the collectives layers call. Nothing above parallel/ reaches torch.distributed directly."""

from parallel.distributed.group import TPGroup

__all__ = ["TPGroup"]
