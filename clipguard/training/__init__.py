"""Contrastive fine-tuning: the victim's training that mounts an attack, and the sterilizing
fine-tune that repairs a poisoned model (Yang et al. 2023, §4.1 and §5).

`finetune(model, shards, FinetuneConfig(), out)` -> `FinetuneResult`; see `loop.py` for a step,
`stream.py` for the data order, `optim.py` for the optimizer and schedule, `state.py` for resume.
"""

from clipguard.training.config import (
    BadSampleTally,
    FinetuneConfig,
    FinetuneError,
    FinetuneResult,
    TrainProgress,
)
from clipguard.training.loop import finetune, plan_total_steps, text_features
from clipguard.training.optim import learning_rate
from clipguard.training.side_by_side import FinetuneJob, finetune_side_by_side, run_finetune_job, side_by_side_pool
from clipguard.training.state import resume_state_path

__all__ = [
    "BadSampleTally", "FinetuneConfig", "FinetuneError", "FinetuneJob", "FinetuneResult", "TrainProgress",
    "finetune", "finetune_side_by_side", "learning_rate", "plan_total_steps", "resume_state_path", "run_finetune_job",
    "side_by_side_pool", "text_features",
]  # fmt: skip
