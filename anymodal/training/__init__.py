"""Training: NExT-GPT's three alignment stages under accelerate (and peft for stage 3).

    from anymodal.training import train
    train("configs/tiny.yaml", "data/captions.jsonl", "runs/stage1", stage=1, max_steps=100)

See ``docs/training.md`` for the manifest formats, the stages and the commands.
"""

from .config import TrainingConfig
from .merge import merge_lora
from .trainer import TrainResult, latest_checkpoint, train

__all__ = ["TrainingConfig", "TrainResult", "train", "latest_checkpoint", "merge_lora"]
