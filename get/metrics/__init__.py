"""Sample-quality metrics (docs/METRICS.md), in three modules:

- ``get.metrics.inception``: FID, KID and Inception Score through clean-fid's own pipeline, fully offline (a missing
  Inception file or reference statistics raise ``MissingAssetError`` saying what to place where);
- ``get.metrics.exact``: exact metrics against the analytic teacher (``MixtureEvaluator``), no weights needed;
- ``get.metrics.frechet``: the Fréchet distance and Gaussian statistics both use.

The public names of the three are available here (``from get import metrics; metrics.fid(...)``), with
``get.images.to_uint8``, EDM's quantisation of generated images before they are measured.
"""

from get.images import to_uint8
from get.metrics.exact import MixtureEvaluator, RandomConvFeatures, evaluate_mixture
from get.metrics.frechet import GaussianReference, GaussianStats, as_features, frechet_distance
from get.metrics.inception import (
    INCEPTION_FILE,
    MODES,
    STATS_URL,
    InceptionProbs,
    MissingAssetError,
    fid,
    image_features,
    inception_dir,
    inception_features,
    inception_path,
    inception_score,
    inception_score_from_probs,
    kid,
    load_npz_images,
    make_reference_stats,
    reference_stats_filename,
    reference_stats_path,
    stats_dir,
)

__all__ = [
    "to_uint8", "MixtureEvaluator", "RandomConvFeatures", "evaluate_mixture", "GaussianReference", "GaussianStats",
    "as_features", "frechet_distance", "INCEPTION_FILE", "MODES", "STATS_URL", "InceptionProbs", "MissingAssetError",
    "fid", "image_features", "inception_dir", "inception_features", "inception_path", "inception_score",
    "inception_score_from_probs", "kid", "load_npz_images", "make_reference_stats", "reference_stats_filename",
    "reference_stats_path", "stats_dir",
]
