"""The EDM teacher side: networks with the official state-dict layout, safe checkpoint loading, the Heun sampler."""

from get.edm.checkpoint import (
    OFFICIAL_CHECKPOINTS,
    UnsafePickleError,
    cache_dir,
    load_converted,
    load_edm,
    read_edm_pickle,
    resolve_checkpoint,
    save_teacher,
)
from get.edm.networks import DhariwalUNet, SongUNet
from get.edm.precond import PRECONDITIONERS, EDMPrecond, VEPrecond, VPPrecond, iDDPMPrecond
from get.edm.sampler import StackedRandomGenerator, edm_sampler, edm_time_steps, parse_seeds, seed_inputs

__all__ = [
    "OFFICIAL_CHECKPOINTS", "UnsafePickleError", "cache_dir", "load_converted", "load_edm", "read_edm_pickle",
    "resolve_checkpoint", "save_teacher", "SongUNet", "DhariwalUNet", "PRECONDITIONERS", "EDMPrecond", "VEPrecond",
    "VPPrecond", "iDDPMPrecond", "StackedRandomGenerator", "edm_sampler", "edm_time_steps", "parse_seeds",
    "seed_inputs",
]
