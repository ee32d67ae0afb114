"""The promotion gate and the generated mlx-lm configuration: pure functions, no model."""

from __future__ import annotations

import pytest
import yaml

from mailrouter.config import load_settings
from mailrouter.training.config import build_run, iterations
from mailrouter.training.gate import Decision, GateRules, Scores, decide

BASE = Scores(accuracy=0.70, macro_f1=0.65, n=40)
CURRENT = Scores(accuracy=0.80, macro_f1=0.78, n=40)


def test_first_model_is_published_when_it_reaches_the_baseline() -> None:
    decision = decide(Scores(0.75, 0.7, 40), None, BASE)
    assert decision == Decision(True, decision.reason)
    assert "first model" in decision.reason


def test_candidate_below_the_baseline_is_rejected_even_without_a_model_in_service() -> None:
    decision = decide(Scores(0.60, 0.6, 40), None, BASE)
    assert not decision.publish
    assert "baseline" in decision.reason and "0.600" in decision.reason


@pytest.mark.parametrize(
    ("candidate", "word"),
    [
        (Scores(0.775, 0.80, 40), "accuracy"),  # worse accuracy, better F1
        (Scores(0.80, 0.77, 40), "macro-F1"),  # same accuracy, worse F1
    ],
)
def test_candidate_worse_than_the_model_in_service_on_either_score_is_rejected(
    candidate: Scores, word: str
) -> None:
    decision = decide(candidate, CURRENT, BASE)
    assert not decision.publish
    assert word in decision.reason and "in service" in decision.reason


def test_not_worse_is_enough_and_ties_pass() -> None:
    assert decide(CURRENT, CURRENT, BASE).publish
    # Float noise from different denominators must not flip a tie.
    assert decide(Scores(0.1 + 0.2, 0.5, 10), Scores(0.3, 0.5, 10), None).publish


def test_required_gains_come_from_the_rules() -> None:
    rules = GateRules(min_accuracy_gain=0.05)
    assert not decide(Scores(0.82, 0.9, 40), CURRENT, BASE, rules).publish
    assert decide(Scores(0.85, 0.9, 40), CURRENT, BASE, rules).publish
    strict = GateRules(min_baseline_gain=0.01)
    assert not decide(Scores(0.70, 0.9, 40), None, BASE, strict).publish
    assert decide(Scores(0.70, 0.9, 40), None, BASE).publish
    lenient = GateRules(min_baseline_gain=-1.0)
    assert decide(Scores(0.05, 0.05, 40), None, BASE, lenient).publish


def test_empty_test_split_is_never_published() -> None:
    assert not decide(Scores(0.0, 0.0, 0), None, None).publish


def test_iterations_follow_epochs_and_are_capped() -> None:
    assert iterations(100, epochs=3, batch_size=2, max_iters=600) == 150
    assert iterations(1000, epochs=3, batch_size=2, max_iters=600) == 600
    assert iterations(5, epochs=0.1, batch_size=4, max_iters=600) == 1


def test_run_config_is_a_complete_mlx_lm_yaml(tmp_path) -> None:
    settings = load_settings(training={"batch_size": 4, "lora_rank": 4, "epochs": 2})
    run = build_run(
        settings.training,
        model="/models/tiny",
        data_dir=tmp_path / "data",
        adapter_dir=tmp_path / "adapters",
        n_train=40,
        n_valid=3,
    )
    data = yaml.safe_load(run.to_yaml())
    # The smallest split (3 valid examples) bounds the batch size: mlx-lm needs one full batch.
    assert data["batch_size"] == 3
    assert data["iters"] == iterations(40, epochs=2, batch_size=3, max_iters=600)
    assert data["lora_parameters"] == {
        "rank": 4,
        "scale": settings.training.lora_scale,
        "dropout": settings.training.lora_dropout,
        "keys": settings.training.lora_keys,
    }
    assert data["train"] is True and data["mask_prompt"] is True and data["grad_checkpoint"]
    assert data["save_every"] > data["iters"]
    assert (
        build_run(
            settings.training,
            model="m",
            data_dir=tmp_path,
            adapter_dir=tmp_path,
            n_train=40,
            n_valid=8,
            iters=7,
        ).iters
        == 7
    )
    with pytest.raises(ValueError, match="valid"):
        build_run(
            settings.training,
            model="m",
            data_dir=tmp_path,
            adapter_dir=tmp_path,
            n_train=4,
            n_valid=0,
        )
