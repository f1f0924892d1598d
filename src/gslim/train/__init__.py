"""The training engine: supervised training and knowledge distillation, single process or DDP.

- :mod:`.loop` - :func:`fit`, the training loop;
- :mod:`.stage` - the train stage of a recipe (``gslim train`` and ``gslim run``);
- :mod:`.evaluate` - top-1/top-5 scoring;
- :mod:`.optim` - lr rule and schedule, optimizer, distillation loss, mixed precision;
- :mod:`.state` - the resumable ``last.pt`` and RNG states;
- :mod:`.distributed` - torchrun process groups and per-rank seeds;
- :mod:`.loaders` - training and validation loaders;
- :mod:`.selection` - held-out checkpoint selection during fine-tunes.
"""

from gslim.train.context import TrainResult
from gslim.train.distributed import DistInfo, cleanup_distributed, init_distributed, seed_everything
from gslim.train.evaluate import evaluate, evaluate_on_recipe
from gslim.train.loop import fit
from gslim.train.optim import build_optimizer, distill_loss, lr_at_step, param_groups, scaled_lr
from gslim.train.state import check_outputs

__all__ = [
    "DistInfo",
    "TrainResult",
    "build_optimizer",
    "check_outputs",
    "cleanup_distributed",
    "distill_loss",
    "evaluate",
    "evaluate_on_recipe",
    "fit",
    "init_distributed",
    "lr_at_step",
    "param_groups",
    "scaled_lr",
    "seed_everything",
]
