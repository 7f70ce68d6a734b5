"""Bad configuration fails at construction, naming the argument and what to do instead."""

import pytest
from conftest import make_config


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"alpha": 0.0}, "`alpha` must be a finite number > 0"),
        ({"alpha": float("nan")}, "`alpha` must be a finite number > 0"),
        ({"temperature": 0.7}, "`temperature=0.7` is not supported by PowerFlow: must be 1.0"),
        ({"num_generations": 1, "per_device_train_batch_size": 1}, "at least 2 generations per prompt"),
        ({"max_completion_length": 0}, "`max_completion_length` must be >= 1"),
        ({"log_z_conditioning": "hidden_states"}, "`log_z_conditioning` must be 'embedding', 'hidden' or 'scalar'"),
        ({"log_z_conditioning": "prompt"}, "`log_z_conditioning='prompt'` is now 'embedding'"),
        ({"log_z_init": "one"}, "`log_z_init` must be 'first_batch' or 'zero'"),
        ({"log_z_learning_rate": 0.0}, "`log_z_learning_rate` must be > 0"),
        ({"log_z_hidden_size": 0}, "`log_z_hidden_size` must be >= 1"),
        ({"epsilon": 1.0}, "need 0 <= epsilon < 1"),
        ({"sync_ref_model": True}, "`sync_ref_model=True` is not supported by PowerFlow: it would move the base"),
    ],
)
def test_bad_configuration_is_refused_with_a_clear_message(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make_config(tmp_path, **overrides)


def test_beta_is_ignored_with_a_warning(tmp_path):
    with pytest.warns(UserWarning, match="`beta=0.1` is ignored"):
        config = make_config(tmp_path, beta=0.1)
    assert config.epsilon_high == 0.28 and config.alpha == 4.0


def test_vllm_importance_sampling_correction_is_off_and_ignored_with_a_warning(tmp_path):
    # GRPOConfig turns it on by default; TB's fixed point does not depend on the sampler, so PowerFlow turns it off
    # (and TRL then skips the forward that computes the ratio)
    assert make_config(tmp_path).vllm_importance_sampling_correction is False
    with pytest.warns(UserWarning, match="`vllm_importance_sampling_correction=True` is ignored"):
        config = make_config(tmp_path, vllm_importance_sampling_correction=True)
    assert config.vllm_importance_sampling_correction is False
