"""longcot.engine: the RL engine (configuration, rollouts, rewards, algorithms, trainer, CLI).

    from longcot.engine import TrainConfig, Trainer
    summary = Trainer(TrainConfig()).fit()   # what `longcot train` runs
"""

from .config import TrainConfig, load_config


def __getattr__(name: str):
    # The trainer pulls in transformers; import it only when asked for.
    if name == "Trainer":
        from .trainer import Trainer

        return Trainer
    raise AttributeError(name)


__all__ = ["TrainConfig", "Trainer", "load_config"]
