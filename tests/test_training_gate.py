"""The promotion gate and the generated mlx-lm configuration: pure functions, no model."""

from __future__ import annotations

from dataclasses import replace

import pytest
import yaml

from mailrouter.config import default_departments, load_settings
from mailrouter.training.config import build_run, iterations
from mailrouter.training.evaluation import Item, Report
from mailrouter.training.gate import Decision, GateRules, Scores, decide
from mailrouter.training.runner import recorded_scores, scores

BASE = Scores(accuracy=0.70, macro_f1=0.65, n=40)
RECALL = {"RH": 0.9, "Support": 0.8, "Commercial": 0.7, "Finance": 0.8, "SPAM": 0.9}
CURRENT = Scores(accuracy=0.80, macro_f1=0.78, n=40, recall=RECALL, false_spam=1)


def candidate(**changes) -> Scores:
    """The model in service's scores with ``changes``: every other figure ties."""
    return replace(CURRENT, **changes)


def test_first_model_is_published_when_it_reaches_the_baseline() -> None:
    decision = decide(Scores(0.75, 0.7, 40), None, BASE)
    assert decision == Decision(True, decision.reason, "first_model")
    assert "first model" in decision.reason and "0.750" in decision.reason


def test_candidate_below_the_baseline_is_rejected_even_without_a_model_in_service() -> None:
    decision = decide(Scores(0.60, 0.6, 40), None, BASE)
    assert (decision.publish, decision.rule) == (False, "baseline")
    assert "baseline" in decision.reason and "0.600" in decision.reason


@pytest.mark.parametrize(
    ("changes", "rule", "numbers"),
    [
        ({"accuracy": 0.775, "macro_f1": 0.80}, "accuracy", ["0.775", "0.800"]),
        ({"macro_f1": 0.77}, "macro_f1", ["0.770", "0.780"]),
    ],
)
def test_candidate_worse_than_the_model_in_service_on_either_score_is_rejected(
    changes: dict, rule: str, numbers: list[str]
) -> None:
    decision = decide(candidate(**changes), CURRENT, BASE)
    assert (decision.publish, decision.rule) == (False, rule)
    assert "in service" in decision.reason
    assert all(n in decision.reason for n in numbers), decision.reason


def test_a_department_that_loses_more_recall_than_allowed_is_refused() -> None:
    """Better overall, but Commercial is lost: accuracy can rise while a department sinks."""
    worse = candidate(accuracy=0.9, macro_f1=0.9, recall={**RECALL, "Commercial": 0.55})
    decision = decide(worse, CURRENT, BASE)
    assert (decision.publish, decision.rule) == (False, "recall:Commercial")
    assert "0.550" in decision.reason and "0.700" in decision.reason
    assert "0.100 (max_recall_drop)" in decision.reason and "in service" in decision.reason
    # A drop within the margin passes; the margin comes from the rules.
    assert decide(candidate(recall={**RECALL, "Commercial": 0.6}), CURRENT, BASE).publish
    strict = GateRules(max_recall_drop=0.0)
    assert decide(worse, CURRENT, BASE, strict).rule == "recall:Commercial"
    assert not decide(candidate(recall={**RECALL, "RH": 0.85}), CURRENT, BASE, strict).publish
    # A department the candidate never answers right has recall 0.
    missing = {k: v for k, v in RECALL.items() if k != "SPAM"}
    assert decide(candidate(recall=missing), CURRENT, BASE).rule == "recall:SPAM"


def test_more_real_mail_sent_to_spam_is_refused() -> None:
    decision = decide(candidate(accuracy=0.9, macro_f1=0.9, false_spam=2), CURRENT, BASE)
    assert (decision.publish, decision.rule) == (False, "false_spam")
    assert "2 real email(s) of 40 sent to spam" in decision.reason
    assert "in service sends 1" in decision.reason
    assert decide(candidate(false_spam=0), CURRENT, BASE).publish


def test_not_worse_is_enough_and_ties_pass() -> None:
    decision = decide(CURRENT, CURRENT, BASE)
    assert (decision.publish, decision.rule) == (True, "all_rules_pass")
    assert "real mail to spam 1 (in service 1)" in decision.reason
    assert "baseline 0.700" in decision.reason
    # Float noise from different denominators must not flip a tie.
    assert decide(Scores(0.1 + 0.2, 0.5, 10), Scores(0.3, 0.5, 10), None).publish
    tied = {"RH": 0.1 + 0.2}
    assert decide(Scores(0.3, 0.5, 10, tied), Scores(0.3, 0.5, 10, {"RH": 0.4}), None).publish


def test_rules_without_a_recorded_figure_are_skipped_and_said() -> None:
    """A model in service recorded before recall and false spam were measured."""
    old = Scores(0.80, 0.78, 40)
    decision = decide(candidate(false_spam=9, recall={}), old, BASE)
    assert (decision.publish, decision.rule) == (True, "all_rules_pass")
    assert "not checked" in decision.reason and "recall, false_spam" in decision.reason


def test_the_first_failing_rule_decides() -> None:
    everything_worse = Scores(0.5, 0.4, 40, {k: 0.0 for k in RECALL}, 40)
    assert decide(everything_worse, CURRENT, BASE).rule == "baseline"
    assert decide(everything_worse, CURRENT, None).rule == "accuracy"
    assert decide(candidate(macro_f1=0.1, false_spam=5), CURRENT, BASE).rule == "macro_f1"
    both = candidate(recall={**RECALL, "RH": 0.0}, false_spam=5)
    assert decide(both, CURRENT, BASE).rule == "recall:RH"


def test_required_gains_come_from_the_rules() -> None:
    rules = GateRules(min_accuracy_gain=0.05)
    assert decide(candidate(accuracy=0.82, macro_f1=0.9), CURRENT, BASE, rules).rule == "accuracy"
    assert decide(candidate(accuracy=0.85, macro_f1=0.9), CURRENT, BASE, rules).publish
    strict = GateRules(min_baseline_gain=0.01)
    assert not decide(Scores(0.70, 0.9, 40), None, BASE, strict).publish
    assert decide(Scores(0.70, 0.9, 40), None, BASE).publish
    lenient = GateRules(min_baseline_gain=-1.0)
    assert decide(Scores(0.05, 0.05, 40), None, BASE, lenient).publish


def test_empty_test_split_is_never_published() -> None:
    decision = decide(Scores(0.0, 0.0, 0), None, None)
    assert (decision.publish, decision.rule) == (False, "empty_test")


def test_gate_scores_come_from_the_evaluation_report() -> None:
    """Recall per department and false spam, computed from the predictions."""
    departments = default_departments()
    items = [
        Item("1", "", "", "RH", "RH", 0.9),
        Item("2", "", "", "RH", "SPAM", 0.2),  # real mail answered as spam, even unsure
        Item("3", "", "", "Support", "SPAM", 0.9),
        Item("4", "", "", "Support", "Support", 0.9),
        Item("5", "", "", "SPAM", "SPAM", 0.9),
        Item("6", "", "", "SPAM", "RH", 0.9),  # spam let through is not false spam
        Item("7", "", "", "Finance", None, 0.0),
    ]
    report = Report("m", [d.name for d in departments], 0.5, items, spam_labels=("SPAM",))
    got = scores(report)
    assert got.recall == {"RH": 0.5, "Support": 0.5, "Finance": 0.0, "SPAM": 0.5}
    assert got.false_spam == 2 and got.n == 7
    summary = report.summary()
    assert summary["false_spam"] == 2 and summary["recall"]["RH"] == 0.5
    assert recorded_scores(summary) == got
    assert recorded_scores({"accuracy": 0.5}) is None
    assert recorded_scores({"accuracy": 0.5, "macro_f1": 0.4}) == Scores(0.5, 0.4, 0)


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
