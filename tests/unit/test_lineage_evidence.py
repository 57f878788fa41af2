"""`conveyor models` and `conveyor lineage` show the Evaluator's evidence (eval set size, test, p-value) and say
why a model was not blessed, read from an ML Metadata store written here the way the Evaluator records it."""
from __future__ import annotations

from conveyor_ml.metadata.index import MetadataIndex
from conveyor_ml.operations.lineage import Lineage
from conveyor_ml.operations.lineage_render import evidence_text, lineage_text
from tests.unit.test_span_progress import COMPLETE, Store

# What components/evaluator/executor.py records on the ModelEvaluation and the ModelBlessing.
LACKING = {"decision": "rejected", "eval_examples": 60, "eval_spans": "3", "candidate_accuracy": 0.95,
           "comparison_test": "McNemar exact, one-sided", "p_value": 0.5, "baseline_accuracy": 0.9333,
           "accuracy_difference": 0.0167, "difference_interval_low": -0.03, "difference_interval_high": 0.05,
           "min_eval_examples": 100,
           "reason": "not enough evidence: 60 eval examples, fewer than the 100 a comparison needs (one example is "
                     "1.7 points, max_accuracy_drop 0.01); widen data.window_spans or set evaluator.golden_span: "
                     "0.9500 vs 0.9333 for baseline model #2 on the same 60 examples (+1.7 points, 90% interval "
                     "-3.0 to +5.0; McNemar exact, one-sided p=0.5)"}


def recorded_history(directory) -> Store:
    """Model #2 (span 1) blessed without a baseline; model #6 (spans 1-3, window 1: span 3's eval split alone)
    compared with #2 on 60 examples and not blessed for lack of evidence."""
    directory.mkdir(parents=True, exist_ok=True)
    store = Store(directory / "metadata.sqlite")
    span_1 = store.artifact("Examples", span=1)
    first = store.artifact("Model", spans="1")
    first_evaluation = store.artifact("ModelEvaluation", decision="blessed", eval_examples=91, eval_spans="1",
                                      accuracy=0.967, reason="accuracy 0.9670 on 91 eval examples reaches min_accuracy")
    first_blessing = store.artifact("ModelBlessing", blessed=1, current_model_id=first)
    store.run("r1", ("ImportExampleGen", COMPLETE, {}, {"examples": [span_1]}),
              ("Trainer", COMPLETE, {"examples": [span_1]}, {"model": [first]}),
              ("Evaluator", COMPLETE, {"examples": [span_1], "model": [first]},
               {"evaluation": [first_evaluation], "blessing": [first_blessing]}))
    span_3 = store.artifact("Examples", span=3)
    second = store.artifact("Model", spans="3")
    evaluation = store.artifact("ModelEvaluation", accuracy=0.95, **LACKING)
    blessing = store.artifact("ModelBlessing", blessed=0, current_model_id=second, **LACKING)
    store.run("r2", ("ImportExampleGen", COMPLETE, {}, {"examples": [span_3]}),
              ("Trainer", COMPLETE, {"examples": [span_3]}, {"model": [second]}),
              ("Evaluator", COMPLETE, {"examples": [span_3], "model": [second], "baseline_model": [first]},
               {"evaluation": [evaluation], "blessing": [blessing]}))
    return store


def test_a_model_rejected_for_lack_of_evidence_says_so_with_its_test_p_value_and_eval_set(tmp_path):
    lineage = Lineage(MetadataIndex(recorded_history(tmp_path).store), "mnist")
    first, second = lineage.models()
    assert (first.state, first.blessed, first.eval_examples, first.p_value) == ("blessed", True, 91, None)
    assert (second.state, second.blessed) == ("rejected", False)
    assert second.reason.startswith("not blessed by the Evaluator: not enough evidence: 60 eval examples")
    assert evidence_text(second) == "n=60 +1.7pt p=0.5"

    chain = lineage.lineage(second.model_id)
    assert chain.evaluation.baseline_model_id == first.model_id
    assert (chain.evaluation.eval_examples, chain.evaluation.eval_spans) == (60, "3")
    assert (chain.evaluation.comparison_test, chain.evaluation.p_value) == ("McNemar exact, one-sided", 0.5)
    assert chain.to_json()["evaluation"]["decision"] == "rejected"
    text = "\n".join(lineage_text(chain))
    assert "evaluated: accuracy 0.95 on 60 eval examples of spans 3 (" in text
    assert f"vs baseline #{first.model_id}) -> NOT blessed" in text
    assert "    evidence: not enough evidence: 60 eval examples, fewer than the 100 a comparison needs" in text
    assert "McNemar exact, one-sided p=0.5)" in text


def test_an_eval_config_edited_into_nonsense_is_read_as_no_thresholds(tmp_path):
    """The Evaluator records its EvalConfig as JSON; a store edited by hand may hold anything there. Before,
    `conveyor models` and `lineage` ended in AttributeError (a list) or ValueError (a threshold "abc")."""
    store = recorded_history(tmp_path).store
    evaluator_type = store.get_execution_type("Evaluator").id
    [_, second] = [e for e in store.get_executions() if e.type_id == evaluator_type]
    for nonsense in ("[1, 2]", '{"metrics_specs": [{"metrics": [{"threshold": {"change_threshold": '
                               '{"absolute": "abc"}}}]}]}', '{"metrics_specs": 5}', "{" * 5000):
        second.custom_properties["eval_config"].string_value = nonsense
        store.put_executions([second])
        lineage = Lineage(MetadataIndex(store), "mnist")
        rows = lineage.models()
        assert [row.state for row in rows] == ["blessed", "rejected"]
        assert rows[1].reason.startswith("not blessed by the Evaluator: not enough evidence: 60 eval examples")
        assert lineage.lineage(rows[1].model_id).evaluation.eval_examples == 60
