"""shapnets: self-explaining neural networks whose explanations come out of the forward pass.

Core objects:

* `Explanation` - attributions, base value and output, with a local-accuracy check, `top(k)`, `plot()`,
  `to_shap()` and `to_pandas()` (matplotlib, shap and pandas imported only by those methods).
* `ShapleyModule`, `ShapleyModuleBank` - exact Shapley values of small inner networks.
* `ShallowShapNet` (exact Shapley), `DeepShapNet` and `ConvShapNet` (local accuracy + missingness,
  layer-wise explanations).
* `exact_shapley` - the brute-force oracle for any callable.
* `Interactions`, `exact_interactions` - exact Harsanyi dividends and pairwise Shapley interaction indices
  (`model.interactions(...)`), and their brute-force oracle.
* `InterpretableCNN`, `InterpretableConv2d` - Interpretable CNNs (Zhang et al. 2018): peak-masked top filters,
  the filter loss and the location-instability metric.
* `CapsNet` - capsule networks with dynamic routing (Sabour et al. 2017): `squash`, `dynamic_routing`, the margin
  and reconstruction losses, and a routing-based attribution map (exact local accuracy, not Shapley values).
"""

from .and_or import AndOrInteractions, and_or_interactions, exact_interactions, or_transform
from .capsnet import CapsNet, dynamic_routing, margin_loss, reconstruction_loss, squash
from .contract import LossTerm, SelfExplaining, StepOutput
from .conv import ConvShapNet, ShapleyConv2d
from .deep import DeepShapNet, butterfly_pairs
from .explanation import Explanation, LocalAccuracyError, RankedAttribution
from .fidelity import (
    exact_fidelity_objective,
    fidelity_gaps,
    kernel_size_probabilities,
    masked_inputs,
    patch_players,
    permutation_estimates,
    player_sums,
    prefix_coalitions,
    sample_kernel_coalitions,
    sample_permutation_ranks,
    shapley_kernel_probabilities,
)
from .icnn import (
    FilterLossTerm,
    InterpretableCNN,
    InterpretableConv2d,
    filter_loss,
    location_instability,
    mask_at_peak,
    part_localization,
    part_templates,
)
from .interactions import (
    DecompositionError,
    Interactions,
    RankedInteraction,
    moebius_transform,
    shapley_interaction_index,
)
from .modules import (
    MAX_PLAYERS,
    ShapleyModule,
    ShapleyModuleBank,
    coalition_masks,
    compile_coalitions,
    evaluation_stats,
    shapley_from_values,
)
from .oracle import exact_shapley, pixel_players
from .pruning import configure_pruning, prune_players
from .regularizers import explanation_penalty, l1_sparsity, linf_spreading
from .shallow import ShallowShapNet, make_groups

__version__ = "0.1.0"

__all__ = [
    "MAX_PLAYERS",
    "AndOrInteractions",
    "CapsNet",
    "ConvShapNet",
    "DecompositionError",
    "DeepShapNet",
    "Explanation",
    "FilterLossTerm",
    "Interactions",
    "InterpretableCNN",
    "InterpretableConv2d",
    "LocalAccuracyError",
    "LossTerm",
    "RankedAttribution",
    "RankedInteraction",
    "SelfExplaining",
    "ShallowShapNet",
    "ShapleyConv2d",
    "ShapleyModule",
    "ShapleyModuleBank",
    "StepOutput",
    "and_or_interactions",
    "butterfly_pairs",
    "coalition_masks",
    "compile_coalitions",
    "configure_pruning",
    "dynamic_routing",
    "evaluation_stats",
    "exact_fidelity_objective",
    "exact_interactions",
    "exact_shapley",
    "explanation_penalty",
    "fidelity_gaps",
    "filter_loss",
    "kernel_size_probabilities",
    "l1_sparsity",
    "linf_spreading",
    "location_instability",
    "make_groups",
    "margin_loss",
    "mask_at_peak",
    "masked_inputs",
    "moebius_transform",
    "or_transform",
    "part_localization",
    "part_templates",
    "patch_players",
    "permutation_estimates",
    "pixel_players",
    "player_sums",
    "prefix_coalitions",
    "prune_players",
    "reconstruction_loss",
    "sample_kernel_coalitions",
    "sample_permutation_ranks",
    "shapley_from_values",
    "shapley_interaction_index",
    "shapley_kernel_probabilities",
    "squash",
]
