"""The EDM teacher side: networks with the official state-dict layout, safe checkpoint loading, the Heun sampler.

docs/EDM.md describes the formats, the preconditioning and the sampler. Teachers of any kind (and the converted
format) are loaded through ``get.teachers``.
"""

from get.edm.checkpoint import (
    OFFICIAL_CHECKPOINTS,
    UnsafePickleError,
    cache_dir,
    load_edm,
    read_edm_pickle,
    resolve_checkpoint,
)
from get.edm.networks import DhariwalUNet, SongUNet
from get.edm.precond import PRECONDITIONERS, EDMPrecond, VEPrecond, VPPrecond, iDDPMPrecond
from get.edm.sampler import check_sampler_settings, edm_sampler, edm_time_steps, sampler_sigma_range

__all__ = [
    "OFFICIAL_CHECKPOINTS", "UnsafePickleError", "cache_dir", "load_edm", "read_edm_pickle", "resolve_checkpoint",
    "SongUNet", "DhariwalUNet", "PRECONDITIONERS", "EDMPrecond", "VEPrecond", "VPPrecond", "iDDPMPrecond",
    "edm_sampler", "edm_time_steps", "check_sampler_settings", "sampler_sigma_range",
]
