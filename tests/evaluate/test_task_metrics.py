"""Task metrics on hand-made cases: classification vs scikit-learn, tagging (seqeval entities) by hand."""

import numpy as np
import pytest

from jaxctx.evaluate.task_metrics import TaskMetrics, classification_metrics, tagging_metrics


def test_classification_matches_sklearn():
    from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

    y_true = [0, 0, 1, 1, 1, 2, 2, 3, 0, 2]
    y_pred = [0, 1, 1, 1, 0, 2, 0, 0, 0, 4]  # class 3 never predicted, class 4 never true
    m = classification_metrics(y_true, y_pred, ["a", "b", "c", "d", "e"])
    assert m["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro", zero_division=0))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=[0, 1, 2, 3, 4], zero_division=0)
    for i, name in enumerate("abcde"):
        assert [m["per_class"][name][k] for k in ("precision", "recall", "f1")] == pytest.approx([p[i], r[i], f[i]])
        assert m["per_class"][name]["support"] == s[i]
    # by hand for class a: 2 of the 5 predicted a are right, 2 of the 3 true a found -> p 0.4, r 2/3, f1 0.5
    assert m["per_class"]["a"]["f1"] == pytest.approx(0.5)


def test_tagging_entities_by_hand():
    true = [["B-name", "I-name", "O", "B-num"], ["B-str", "O"]]
    pred = [["B-name", "I-name", "O", "B-str"], ["B-str", "B-num"]]
    m = tagging_metrics(true, pred)
    # true entities: name(0-1), num(3), str(0)  -> 3; predicted: name(0-1), str(3), str(0), num(1) -> 4; correct 2
    assert m["entity_precision"] == pytest.approx(2 / 4)
    assert m["entity_recall"] == pytest.approx(2 / 3)
    assert m["entity_f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert m["token_accuracy"] == pytest.approx(4 / 6)
    assert m["per_type"]["name"]["f1"] == 1.0 and m["per_type"]["num"]["recall"] == 0.0
    # a span with the wrong end is not an entity match (seqeval's CoNLL rule), though 2 of its 3 tokens agree
    assert tagging_metrics([["B-x", "I-x", "I-x"]], [["B-x", "I-x", "O"]])["entity_f1"] == 0.0


def test_accumulator_scores_each_example_once():
    names = ["n", "p"]
    batch = {"labels": np.array([[1, 0, 0]]), "label_mask": np.array([[1.0, 1.0, 0.0]])}
    logits = np.array([[[0.0, 2.0], [0.0, 1.0], [5.0, 0.0]]])  # predicts p, p, (empty slot)
    acc = TaskMetrics("sequence_classification", names, "single_label")
    acc.add(batch, logits, np.array([[0, 1, -1]]))
    acc.add(batch, logits, np.array([[0, 1, -1]]))  # a wrapped-around repeat: ignored
    m = acc.result()
    assert m["examples"] == 2 and m["accuracy"] == 0.5
    tags = ["O", "B-x"]
    tok = {"segment_ids": np.array([[1, 1, 2, 2, 0]]), "labels": np.array([[1, 0, 1, 0, 0]]),
           "loss_mask": np.array([[1.0, 0.0, 1.0, 1.0, 0.0]])}
    tok_logits = np.eye(2)[[1, 1, 0, 0, 0]][None]  # argmax: B-x, B-x, O, O, O
    acc = TaskMetrics("token_classification", tags)
    acc.add(tok, tok_logits, np.array([[0, 1]]))
    assert acc.true == [["B-x"], ["B-x", "O"]] and acc.pred == [["B-x"], ["O", "O"]]
    assert acc.result()["entity_recall"] == 0.5
