"""supsup-lite: Supermasks in Superposition (Wortsman, Ramanujan et al., NeurIPS 2020), small and fast.

A SupSup model is a frozen random base network plus a bank of binary masks, one per task. The public names
below cover the core; the notebooks import the more specialised modules by their submodule path.
"""
from .config import data_root, device, figures_dir, pick_scale, seed_everything
from .core.inference import (
                    alpha_gradient,
                    binary_search,
                    entropy,
                    one_shot,
                    superfluous_logsumexp,
)
from .core.masks import (
                    MaskBank,
                    MaskBankError,
                    apply_masks,
                    final_masks,
                    init_scores,
                    supermask_weight,
                    threshold_supermask,
                    topk_supermask,
)
from .core.models import (
                    build_model,
                    fc_1024_1024,
                    frozen_random_model,
                    batched_masked_forward,
                    lenet_300_100,
                    maskable_parameters,
                    masked_forward,
                    signed_constant_,
)
from .core.superpose import superposed_weights
from .core.training import (
                    TrainHistory,
                    TrainResult,
                    evaluate,
                    masked_weights,
                    predict,
                    train_bank,
                    train_dense,
                    train_supermask,
                    train_supermasks,
)
from .data.mnist import (
                    DataNotFoundError,
                    PermutedMNIST,
                    RotatedMNIST,
                    SplitMNIST,
                    load_mnist,
)
from .scenarios.protocols import (
                    gg_accuracy,
                    gns_accuracy,
                    gnu_accuracy,
                    task_inference_accuracy,
)

__version__ = "0.1.0"
