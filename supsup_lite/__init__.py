"""supsup-lite: Supermasks in Superposition (Wortsman, Ramanujan et al., NeurIPS 2020), small and fast.

A SupSup model is a frozen random base network plus a bank of binary masks, one per task. The names below are
the surface a researcher reuses: task streams, base networks, the bit-packed bank, the superposition kernel, task
inference (one image or many at once), the trainers and the evaluation protocols. The scenarios built on them
(continual-learning harness, Scenario NNs, HopSupSup, SplitCIFAR100 GG, the experiment CLI) and the baselines
live in ``supsup_lite.scenarios`` and ``supsup_lite.baselines``; what only the notebooks use (plots, the α
explorer) in ``supsup_lite.notebook``, which ``import supsup_lite`` does not load.
"""
from .config import derive_seed, device, resolve_device
from .core.inference import (alpha_gradient, alpha_gradient_each, binary_search, binary_search_each, entropy,
                             one_shot, one_shot_each, superfluous_logsumexp)
from .core.masks import (MaskBank, MaskBankError, NetworkFingerprint, apply_masks, final_masks, init_scores,
                         supermask_weight, threshold_supermask, topk_supermask)
from .core.models import (batched_masked_forward, build_model, frozen_random_model, maskable_parameters,
                          masked_forward, signed_constant_)
from .core.superpose import superposed_mask, superposed_weights
from .core.training import (TrainResult, evaluate, predict, train_bank, train_dense, train_supermask,
                            train_supermasks)
from .data import (DataNotFoundError, PermutedMNIST, RotatedMNIST, SplitMNIST, TaskStream, UnsharedLabels,
                   load_mnist)
from .data.mnist import DataDamagedError
from .scenarios.protocols import (ProtocolResult, gg_accuracy, gns_accuracy, gnu_accuracy, gnu_score, infer_tasks,
                                  task_inference_accuracy)

__version__ = "0.1.0"

__all__ = [
    # configuration
    "device", "resolve_device", "derive_seed",
    # task streams
    "TaskStream", "PermutedMNIST", "RotatedMNIST", "SplitMNIST", "UnsharedLabels", "load_mnist",
    "DataNotFoundError", "DataDamagedError",
    # base networks and the masked forward
    "build_model", "frozen_random_model", "signed_constant_", "maskable_parameters", "masked_forward",
    "batched_masked_forward",
    # masks and the bank
    "init_scores", "threshold_supermask", "supermask_weight", "topk_supermask", "final_masks", "apply_masks",
    "MaskBank", "MaskBankError", "NetworkFingerprint",
    # superposition and task inference
    "superposed_mask", "superposed_weights", "entropy", "superfluous_logsumexp", "alpha_gradient", "one_shot",
    "binary_search", "alpha_gradient_each", "one_shot_each", "binary_search_each",
    # training and evaluation
    "TrainResult", "train_supermask", "train_supermasks", "train_bank", "train_dense", "predict", "evaluate",
    # protocols
    "ProtocolResult", "infer_tasks", "gnu_score", "gg_accuracy", "gns_accuracy", "gnu_accuracy",
    "task_inference_accuracy",
]
