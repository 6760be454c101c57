"""longcot.engine: the RL engine (configuration, rollouts, rewards, algorithms, trainer, CLI)."""
