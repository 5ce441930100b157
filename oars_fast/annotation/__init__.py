"""The COMPASS three-stage annotation, library side (the ``annotate`` stage drives it).

1. Global anchors: a :class:`GlobalScorer` scores every LR and SR image on [1, 5] (paper: Q-Insight;
   here :class:`MLLMGlobalScorer`, or the offline :class:`ClassicalQualityScorer`).
2. Intra-group ranking: a :class:`PairwiseComparator` compares all pairs of one LR's SR candidates
   (:func:`preference_matrix`), aggregated to r in [0, 1] by :func:`win_rate` (or :func:`bradley_terry`).
3. Calibration: :func:`calibrate` fits ``q_anchor ~ alpha * r + beta`` per group, ``Q_SR = clip(alpha r + beta)``;
   :func:`trim` drops the samples where anchor and calibration disagree most.

Scores go through a :class:`ScoreCache` so an interrupted run repeats no model call.
"""
from .cache import ScoreCache, cache_key, cached_compare, cached_scores
from .calibration import calibrate, n_trimmed, trim
from .ranking import bradley_terry, preference_matrix, win_rate
from .scorers import (
    ClassicalPairwiseComparator,
    ClassicalQualityScorer,
    GlobalScorer,
    MalformedAnswer,
    MLLMGlobalScorer,
    MLLMPairwiseComparator,
    PairwiseComparator,
    QualityFeatures,
    TransformersChat,
    parse_choice,
    parse_rating,
    quality_features,
)

__all__ = [
    "ClassicalPairwiseComparator", "ClassicalQualityScorer", "GlobalScorer", "MLLMGlobalScorer",
    "MLLMPairwiseComparator", "MalformedAnswer", "PairwiseComparator", "QualityFeatures", "ScoreCache",
    "TransformersChat", "bradley_terry", "cache_key", "cached_compare", "cached_scores", "calibrate", "n_trimmed",
    "parse_choice", "parse_rating", "preference_matrix", "quality_features", "trim", "win_rate",
]
