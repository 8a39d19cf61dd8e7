"""catalog.Schema's list fields (Note [List fields]): groups, columns, schema.json round trip and its checks."""

from __future__ import annotations

import json

import pytest

from mtldsl.catalog import DataError, Schema, field_group, known_groups, schema_from_json, schema_to_json

LISTED = {
    "name": "shop",
    "labels": ["click", "purchase"],
    "sparse": ["user_id", "item_id"],
    "dense": ["price"],
    "lists": ["clicked_items", "tags"],
    "list_weights": {"clicked_items": "clicked_items_w"},
    "groups": {"user": ["user_id", "clicked_items"], "item": ["item_id", "tags"]},
    "user_id": "user_id",
    "vocab_sizes": {"user_id": 10, "item_id": 20, "clicked_items": 20, "tags": 5},
}


def listed(**changes: object) -> str:
    return json.dumps({**LISTED, **changes})


def test_schema_json_round_trips_lists() -> None:
    schema = schema_from_json(listed())
    assert schema.lists == ("clicked_items", "tags")
    assert schema.list_weights == {"clicked_items": "clicked_items_w"}
    assert schema.columns == ("click", "purchase", "user_id", "item_id", "clicked_items", "tags", "clicked_items_w",
                              "price")
    assert schema.vocab(["tags", "user_id"]) == (5, 10)
    again = schema_from_json(schema_to_json(schema, with_vocab=True))
    assert again == schema


def test_groups_keep_all_single_valued() -> None:
    schema = schema_from_json(listed())
    assert field_group(schema, "all") == ("user_id", "item_id")  # every existing spec means the same
    assert field_group(schema, "lists") == ("clicked_items", "tags")
    assert field_group(schema, "user") == ("user_id", "clicked_items")
    assert "lists" in known_groups(schema)
    plain = Schema("p", ("click",), ("a",), (), {}, None)
    assert "lists" not in known_groups(plain) and field_group(plain, "lists") == ()
    assert "lists" not in schema_to_json(plain)  # schemas without lists are written as before
    own = Schema("o", ("click",), ("a", "b"), (), {"lists": ("b",)}, None)  # a group of its own, on data without lists
    assert field_group(own, "lists") == ("b",)


@pytest.mark.parametrize("changes, message", [
    ({"lists": "tags"}, "'lists' must be a list of column names"),
    ({"lists": ["user_id"]}, "'user_id' in both 'lists' and 'sparse'"),
    ({"lists": ["price"]}, "'price' in both 'lists' and 'dense'"),
    ({"list_weights": ["w"]}, "'list_weights' must map list fields to weight column names"),
    ({"list_weights": {"item_id": "w"}}, "'list_weights' names 'item_id', which is not in 'lists'"),
    ({"list_weights": {"tags": "price"}}, "gives 'tags' the weights column 'price', which is a field or label"),
    ({"list_weights": {"tags": "w", "clicked_items": "w"}}, "uses the weights column(s) 'w' twice"),
    ({"groups": {"lists": ["tags"]}}, "group 'lists' is every list field"),
    ({"groups": {"x": ["nope"]}}, "group 'x' lists 'nope', not sparse or list fields"),
    ({"vocab_sizes": {"user_id": 10, "item_id": 20, "clicked_items": 20}}, "'vocab_sizes' lacks 'tags'"),
])
def test_bad_list_schemas(changes: dict[str, object], message: str) -> None:
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        schema_from_json(listed(**changes), path="d/schema.json")
