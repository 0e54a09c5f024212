"""Fine-grained evaluation on tables: make and body type from the class names, slice metrics,
confused pairs and the slice-regression check promotion uses."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cars_ml.training import slices

NAMES = [
    "AM General Hummer SUV 2000",
    "Aston Martin V8 Vantage Coupe 2012",
    "Audi TTS Coupe 2012",
    "Audi S4 Sedan 2012",
    "Ford F-150 Regular Cab 2012",
    "Chevrolet Corvette ZR1 2012",
]


def test_make_and_body_type_come_from_the_names():
    groups = slices.class_groups(NAMES)
    assert groups["make"] == ["AM General", "Aston Martin", "Audi", "Audi", "Ford", "Chevrolet"]
    assert groups["body_type"] == ["SUV", "Coupe", "Coupe", "Sedan", "Pickup", "Other"]


def test_names_without_years_have_no_slices_and_a_csv_gives_them():
    assert slices.class_groups(["cat", "dog", "bird"]) == {}


def test_slices_csv_maps_classes_to_groups(tmp_path):
    path = tmp_path / "slices.csv"
    path.write_text("class,family\ncat,Felidae\ndog,Canidae\nbird,\n", encoding="utf-8")
    assert slices.class_groups(["cat", "dog", "bird"], path) == {
        "family": ["Felidae", "Canidae", "Other"]
    }
    (tmp_path / "short.csv").write_text("class,family\ncat,Felidae\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no row for 2 classes"):
        slices.class_groups(["cat", "dog", "bird"], tmp_path / "short.csv")
    with pytest.raises(ValueError, match="does not exist"):
        slices.class_groups(["cat"], tmp_path / "missing.csv")


def test_the_coarse_task_forgives_a_wrong_model_of_the_right_make():
    labels = np.array([2, 2, 3, 3, 4, 4])
    # Every Audi is mistaken for the other Audi: fine-grained wrong, make right.
    preds = np.array([3, 3, 2, 2, 4, 4])
    metrics, table = slices.slice_metrics(labels, preds, slices.class_groups(NAMES))
    assert metrics["test_f1_macro_make"] == pytest.approx(1.0)
    assert metrics["slice_make_audi_f1_macro"] == 0.0
    assert metrics["slice_make_ford_accuracy"] == 1.0
    assert metrics["test_f1_macro_body_type"] < 1.0  # Coupe and Sedan swapped
    assert table.iloc[0]["f1_macro"] == 0.0
    assert "make=Audi 0.00" in slices.worst_slices(table)


def test_confused_pairs_count_the_most_frequent_mistakes_first():
    labels = np.array([0, 0, 0, 1, 1, 2])
    preds = np.array([1, 1, 0, 0, 1, 2])
    pairs = slices.confused_pairs(labels, preds, NAMES[:3])
    assert list(pairs["count"]) == [2, 1]
    assert pairs.iloc[0]["true"] == NAMES[0] and pairs.iloc[0]["predicted"] == NAMES[1]
    assert pairs.iloc[0]["share_of_true"] == pytest.approx(2 / 3)
    assert slices.confused_pairs(labels, labels, NAMES[:3]).empty


def test_slice_regressions_name_the_slices_lost_by_more_than_the_limit():
    champion = {"slice_make_audi_f1_macro": 0.9, "slice_make_bmw_f1_macro": 0.8, "other": 1.0}
    challenger = {"slice_make_audi_f1_macro": 0.7, "slice_make_bmw_f1_macro": 0.78}
    assert slices.slice_regressions(challenger, champion, 0.05) == [
        ("slice_make_audi_f1_macro", pytest.approx(0.2))
    ]
    assert slices.slice_regressions(challenger, champion, 0.25) == []


def test_the_pipeline_slice_table_has_a_row_per_backbone_with_its_worst_slice():
    from cars_ml.pipeline.report import slice_table

    rows = [
        {
            "backbone": "mobilenet",
            "model_version": "1",
            "metrics": {
                "test_f1_macro_make": 0.8,
                "test_f1_macro_body_type": 0.9,
                "slice_make_audi_f1_macro": 0.4,
                "slice_body_type_van_f1_macro": 0.6,
                "slice_make_audi_accuracy": 0.1,
            },
        },
        {"backbone": "xception", "model_version": "2", "metrics": {"test_f1_macro": 0.5}},
    ]
    table = slice_table(rows)
    assert list(table["backbone"]) == ["mobilenet", "xception"]
    assert table.iloc[0]["worst_slice"] == "make_audi"
    assert table.iloc[0]["worst_slice_f1_macro"] == 0.4
    assert table.iloc[1]["worst_slice"] == "" and pd.isna(table.iloc[1]["test_f1_macro_make"])
