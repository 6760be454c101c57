"""longcot.engine: the RL engine (configuration, rollouts, rewards, algorithms, trainer, CLI).

    from longcot.engine import TrainConfig, Trainer
    summary = Trainer(TrainConfig()).fit()   # what `longcot train` runs

    from longcot.engine import evaluate_benchmark   # what `longcot eval` runs on a generator
"""

from .config import TrainConfig, load_config

_EVALUATE = ("EvalConfig", "EvalResult", "evaluate_benchmark", "load_eval_config")


def __getattr__(name: str):
    # The trainer and the evaluation pull in torch and transformers; import them only when asked.
    if name == "Trainer":
        from .trainer import Trainer

        return Trainer
    if name in _EVALUATE:
        from . import evaluate

        return getattr(evaluate, name)
    raise AttributeError(name)


__all__ = ["EvalConfig", "EvalResult", "TrainConfig", "Trainer", "evaluate_benchmark", "load_config",
           "load_eval_config"]
