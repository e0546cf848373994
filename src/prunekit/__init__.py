"""prunekit: prune large language models after training, then reconstruct them.

Python API::

    import prunekit
    model, tokenizer = prunekit.load_model("smollm2-135m")
    model, report = prunekit.prune(model, tokenizer, prunekit.PruneConfig())
"""

from .config import CalibConfig, EvalConfig, ModelConfig, PruneConfig, RunConfig, SparsityConfig, parse_sparsity
from .errors import PrunekitError
from .evaluate import perplexity
from .models import load_model, save_model
from .pipeline import PruneReport, prune

__all__ = [
    "CalibConfig",
    "EvalConfig",
    "ModelConfig",
    "PruneConfig",
    "PruneReport",
    "PrunekitError",
    "RunConfig",
    "SparsityConfig",
    "load_model",
    "parse_sparsity",
    "perplexity",
    "prune",
    "save_model",
]

__version__ = "0.1.0"
