import subprocess
import sys
from pathlib import Path

import pytest

from longcot.engine.config import ConfigError, TrainConfig, load_config

LONGCOT = str(Path(sys.executable).with_name("longcot"))
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "paper_math.yaml"


def test_defaults_are_valid_and_overrides_apply():
    cfg = load_config(None, ["rollout.temperature=0.7", "optim.lr=1e-5", "reward.channels.1.gamma=0.95",
                             "algorithm.dual_clip=3", "model.path=null"])
    assert isinstance(cfg, TrainConfig)
    assert cfg.rollout.temperature == 0.7 and cfg.optim.lr == 1e-5 and cfg.algorithm.dual_clip == 3.0
    assert cfg.reward.channels[1].gamma == 0.95 and cfg.model.path is None


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 7\nrollout:\n  top_p: 0.9\n")
    cfg = load_config(path, ["steps=9"])
    assert cfg.steps == 9 and cfg.rollout.top_p == 0.9 and cfg.rollout.max_new_tokens == 128


def test_paper_example_loads():
    cfg = load_config(EXAMPLE)
    assert cfg.rollout.max_new_tokens == 16384 and cfg.rollout.temperature == 0.7
    assert [(c.reward, c.gamma) for c in cfg.reward.channels] == [("cosine", 1.0), ("repetition", 0.99)]
    assert cfg.reward.channels[1].params == {"n": 40, "penalty": -0.05}


@pytest.mark.parametrize(
    "override, message",
    [
        ("rollout.tempreature=1", "rollout.tempreature: unknown key"),
        ("optim.lr=-1", "optim.lr: expected a number > 0"),
        ("algorithm.name=ppo2", "algorithm.name: expected one of"),
        ("steps=1.5", "steps: expected an integer"),
        ("reward.channels.5.gamma=1", "reward.channels.5: expected an index below 2"),
        ("reward.channels.0.gamma=2", "reward.channels.0.gamma: expected a number in [0, 1]"),
        ("reward.channels.0.reward=cosin", "reward.channels[0].reward: unknown reward 'cosin'"),
        ("algorithm.lam=0.9", "algorithm.lam: reward channels with different gammas"),
        ("algorithm.max_tokens_per_micro_batch=0", "algorithm.max_tokens_per_micro_batch: expected a number > 0"),
        ("logging.plots=maybe", "logging.plots: expected true or false"),
        ("data.task=file", "data.path: required when task is 'file'"),
        ("model.tiny.heads=3", "model.tiny.heads: must divide hidden"),
        ("sft.target_accuracy=1.5", "sft.target_accuracy: expected a number in (0, 1]"),
        ("sft.eval_every=0", "sft.eval_every: expected a number > 0"),
        ("data.addition.digits=7", "data.addition.digits: expected an integer in [1, 6]"),
        ("data.addition.digits=1", "data.addition.n_train: 4000 train + 256 held-out + 128 validation"),
        ("novalue", "novalue: expected an override of the form key.sub=value"),
        ("algorithm.grpo_std=unbiased", "algorithm.grpo_std: expected one of 'sample', 'population', 'none'"),
        ("algorithm.loss_agg=seq-mean-token-norm", "algorithm.loss_agg: expected one of"),
        ("algorithm.loss_agg_norm=0", "algorithm.loss_agg_norm: expected a number > 0"),
        ("algorithm.ratio=seq", "algorithm.ratio: expected one of 'token', 'sequence'"),
        ("algorithm.kl_estimator=k2+", "algorithm.kl_estimator: expected one of"),
        ("algorithm.kl_clamp=-10", "algorithm.kl_clamp: expected a number > 0"),
        ("algorithm.kl_clamp=ten", "algorithm.kl_clamp: expected a finite number, got 'ten'"),
        ("algorithm.name=reinforce-baseline", "algorithm.name: expected one of"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value).startswith(message)


def test_bad_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("steps: 3\nrollout: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: invalid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_cli_reports_config_errors_in_one_line_with_exit_2():
    proc = subprocess.run([LONGCOT, "train", "optim.lr=-1"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "longcot: error: optim.lr: expected a number > 0, got -1.0"


def test_count_mode_micro_batch_must_fit_the_mini_batch():
    with pytest.raises(ConfigError, match=r"^algorithm\.micro_batch_size: must not exceed"):
        load_config(None, ["algorithm.max_tokens_per_micro_batch=null", "algorithm.micro_batch_size=128"])
    # with a token budget micro_batch_size is not used
    load_config(None, ["algorithm.micro_batch_size=128"])


def test_algorithm_parity_keys():
    a = load_config(None, []).algorithm
    assert (a.grpo_std, a.kl_clamp, a.ratio, a.loss_agg_norm) == ("sample", 10.0, "token", None)
    a = load_config(None, ["algorithm.name=reinforce_baseline", "algorithm.kl_clamp=null", "algorithm.kl_estimator=k3+",
                           "algorithm.loss_agg=seq-mean-token-sum-norm", "algorithm.loss_agg_norm=4096",
                           "algorithm.ratio=sequence", "algorithm.grpo_std=none"]).algorithm
    assert (a.name, a.kl_clamp, a.kl_estimator, a.loss_agg, a.loss_agg_norm, a.ratio, a.grpo_std) == (
        "reinforce_baseline", None, "k3+", "seq-mean-token-sum-norm", 4096.0, "sequence", "none")
    with pytest.raises(ConfigError, match=r"^rollout\.samples_per_prompt: reinforce_baseline needs at least 2"):
        load_config(None, ["algorithm.name=reinforce_baseline", "rollout.samples_per_prompt=1",
                           "algorithm.mini_batch_size=16"])


def test_repetition_metric_n_is_checked_and_defaults_to_the_channels():
    assert load_config(None, []).logging.repetition_n is None
    assert load_config(None, ["logging.repetition_n=12"]).logging.repetition_n == 12
    with pytest.raises(ConfigError, match=r"^logging\.repetition_n"):
        load_config(None, ["logging.repetition_n=0"])
