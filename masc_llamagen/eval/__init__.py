"""Sample-quality evaluation: FID, KID and precision/recall through torch-fidelity with offline Inception weights."""

from masc_llamagen.eval.inception import (
    MISSING_WEIGHTS_MESSAGE,
    InceptionWeightsError,
    convert_fid_helper_torchscript,
    random_inception_weights,
    resolve_inception_weights,
    weights_have_logits,
)
from masc_llamagen.eval.metrics import (
    METRIC_KEYS,
    EvalError,
    compute_metrics,
    dataset_reference_npz,
    default_output_path,
    log_to_wandb,
    write_metrics_json,
)

__all__ = [
    "METRIC_KEYS",
    "MISSING_WEIGHTS_MESSAGE",
    "EvalError",
    "InceptionWeightsError",
    "compute_metrics",
    "convert_fid_helper_torchscript",
    "dataset_reference_npz",
    "default_output_path",
    "log_to_wandb",
    "random_inception_weights",
    "resolve_inception_weights",
    "weights_have_logits",
    "write_metrics_json",
]
