from sft_sharded.trainers.sft_trainer import SFTTrainer
from sft_sharded.trainers.trainer import Trainer, TrainState

__all__ = ["SFTTrainer", "Trainer", "TrainState"]
