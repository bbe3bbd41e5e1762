"""Data: arith generator, JSONL format detection, chat rendering, completion-only labels, collation."""

from __future__ import annotations

import ast
import json
import operator
import re
from fractions import Fraction

import pytest
import torch

from lora_da.data import (
    IGNORE_INDEX,
    Example,
    calibration_batches,
    collate,
    encode_example,
    encode_examples,
    extract_answer,
    generate_arith,
    is_correct,
    load_examples,
    read_jsonl,
    render,
)

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def independent_value(expression: str) -> Fraction:
    """Evaluate + - * / exactly with Fractions by walking the AST (no eval)."""

    def walk(node):
        if isinstance(node, ast.BinOp):
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        assert isinstance(node, ast.Constant) and isinstance(node.value, int)
        return Fraction(node.value)

    return walk(ast.parse(expression, mode="eval").body)


# ------------------------------------------------------------------------------------------------- arith
def test_arith_is_deterministic_and_prefix_stable():
    assert generate_arith("train", 50, seed=3) == generate_arith("train", 50, seed=3)
    assert generate_arith("train", 20, seed=3) == generate_arith("train", 50, seed=3)[:20]
    assert generate_arith("train", 20, seed=3) != generate_arith("train", 20, seed=4)


def test_arith_splits_are_disjoint_even_across_seeds():
    train = {r["expression"] for seed in (0, 1) for r in generate_arith("train", 1500, seed)}
    test = {r["expression"] for seed in (0, 1) for r in generate_arith("test", 300, seed)}
    assert len(test) > 500 and len(train) > 2500
    assert not train & test
    questions = [r["question"] for r in generate_arith("test", 300)]
    assert len(set(questions)) == len(questions)


def test_arith_answers_are_correct():
    for record in generate_arith("train", 300) + generate_arith("test", 100):
        value = independent_value(record["expression"])
        assert value.denominator == 1 and value == record["result"] > 0
        assert extract_answer(record["answer"]) == str(record["result"])
        assert record["answer"].rstrip().endswith(f"#### {record['result']}")
        steps = re.findall(r"^(\d+) ([-+*/]) (\d+) = (\d+)\.$", record["answer"], flags=re.M)
        assert 2 <= len(steps) <= 4
        for a, op, b, c in steps:
            assert independent_value(f"{a} {op} {b}") == int(c)
        assert int(steps[-1][3]) == record["result"]


def test_arith_uses_several_templates():
    questions = [r["question"] for r in generate_arith("train", 200)]
    openings = {q.split(" ")[0] for q in questions}
    assert len(openings) > 5
    assert sum("How many" in q for q in questions) not in (0, len(questions))


def test_arith_rejects_bad_split():
    with pytest.raises(ValueError, match="unknown split"):
        generate_arith("valid", 3)


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("so 3 + 4 = 7\n#### 7", "#### 7", True),
        ("#### 1,024", "#### 1024", True),
        ("#### 7.0", "#### 7", True),
        ("#### 8 and then #### 7", "#### 7", True),
        ("the answer is 7", "#### 7", False),
        ("#### 70", "#### 7", False),
        ("#### -7", "#### 7", False),
    ],
)
def test_exact_match_of_final_number(prediction, reference, expected):
    assert is_correct(prediction, reference) is expected


# ------------------------------------------------------------------------------------------------- JSONL
def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_formats_are_detected(tmp_path):
    path = _write(tmp_path / "mixed.jsonl", [
        json.dumps({"prompt": "p", "completion": "c"}),
        json.dumps({"question": "q", "answer": "a", "id": 7}),
        json.dumps({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                                 {"role": "assistant", "content": "a"}]}),
        "",
        json.dumps({"text": "plain"}),
    ])
    examples = read_jsonl(path)
    assert [e.kind for e in examples] == ["prompt_completion", "question_answer", "messages", "text"]
    assert examples[1].meta == {"id": 7}
    assert examples[2].prompt[-1] == {"role": "user", "content": "u"} and examples[2].completion == "a"
    assert examples[3].prompt == "" and not examples[3].is_qa


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "invalid JSON"),
        (json.dumps({"input": "x"}), "expected fields"),
        (json.dumps({"prompt": "x", "completion": 3}), "must be a string"),
        (json.dumps({"messages": [{"role": "user", "content": "u"}, {"role": "user", "content": "v"}]}),
         "role 'assistant'"),
        (json.dumps([1, 2]), "JSON object"),
    ],
)
def test_bad_line_names_file_and_line(tmp_path, line, message):
    path = _write(tmp_path / "bad.jsonl", [json.dumps({"text": "fine"}), line])
    with pytest.raises(ValueError, match=message) as info:
        read_jsonl(path)
    assert "bad.jsonl:2" in str(info.value)


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(ValueError, match="no examples"):
        read_jsonl(_write(tmp_path / "empty.jsonl", [""]))
    with pytest.raises(FileNotFoundError, match="not found"):
        read_jsonl(tmp_path / "missing.jsonl")
    with pytest.raises(FileNotFoundError, match="neither a file nor a built-in task"):
        load_examples("no-such-task")


def test_load_examples_builtin_and_file(tiny_jsonl):
    assert len(load_examples("arith", num_examples=7)) == 7
    test = load_examples("arith", default_split="test", num_examples=5)
    assert [e.prompt for e in test] == [e.prompt for e in load_examples("arith:test", num_examples=5)]
    assert test[0].kind == "question_answer"
    assert len(load_examples(str(tiny_jsonl), num_examples=5)) == 5


# --------------------------------------------------------------------------------------------- encoding
def test_chat_template_and_completion_only_labels(tiny_tokenizer):
    example = Example("what is 2+2?", "#### 4", "question_answer")
    prompt, completion = render(example, tiny_tokenizer)
    assert prompt == "<|im_start|>user\nwhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert completion == "#### 4<|im_end|>\n"
    feature = encode_example(example, tiny_tokenizer, max_length=512)
    ids, labels = feature["input_ids"], feature["labels"]
    assert len(ids) == len(labels)
    supervised = [t for t in labels if t != IGNORE_INDEX]
    assert tiny_tokenizer.decode(supervised) == completion
    n_prompt = labels.index(next(t for t in labels if t != IGNORE_INDEX))
    assert tiny_tokenizer.decode(ids[:n_prompt]) == prompt
    full = encode_example(example, tiny_tokenizer, max_length=512, completion_only=False)
    assert full["labels"] == full["input_ids"] == ids


def test_plain_text_and_no_template(tiny_tokenizer):
    text = encode_example(Example("", "hello", "text"), tiny_tokenizer, 512)
    assert all(t != IGNORE_INDEX for t in text["labels"])
    tokenizer = _copy_without_template(tiny_tokenizer)
    prompt, completion = render(Example("q?", "a", "prompt_completion"), tokenizer)
    assert (prompt, completion) == ("q?\n", "a<|im_end|>")


def _copy_without_template(tokenizer):
    import copy

    clone = copy.deepcopy(tokenizer)
    clone.chat_template = None
    return clone


def test_truncation_and_dropping(tiny_tokenizer):
    example = Example("p" * 30, "c" * 30, "prompt_completion")
    feature = encode_example(example, tiny_tokenizer, max_length=50)
    assert len(feature["input_ids"]) == 50
    assert any(t != IGNORE_INDEX for t in feature["labels"])
    kept = encode_examples([example, Example("short", "ok", "prompt_completion")], tiny_tokenizer, 30)
    assert len(kept) == 1
    with pytest.raises(ValueError, match="raise max_length"):
        encode_examples([example], tiny_tokenizer, max_length=10)


def test_collate_pads_both_sides():
    features = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    right = collate(features, pad_token_id=0)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    left = collate(features, pad_token_id=0, padding_side="left")
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert left["input_ids"].dtype == torch.long


def test_calibration_batches_are_seeded_and_capped():
    features = [{"input_ids": [i + 1, 0], "labels": [i + 1, 0]} for i in range(10)]
    first = calibration_batches(features, 6, 4, 0, seed=1)
    again = calibration_batches(features, 6, 4, 0, seed=1)
    assert [b["input_ids"].tolist() for b in first] == [b["input_ids"].tolist() for b in again]
    assert [b["input_ids"].shape[0] for b in first] == [4, 2]
    assert sum(b["input_ids"].shape[0] for b in calibration_batches(features, 99, 4, 0)) == 10


# ------------------------------------------------------------------------------------------- stdlib-code
def test_stdlib_code_splits_by_module_and_is_deterministic():
    from lora_da.data.stdlib_code import module_files

    train_modules = {p.stem for p in module_files("train")}
    test_modules = {p.stem for p in module_files("test")}
    assert len(test_modules) >= 5 and len(train_modules) > 3 * len(test_modules)
    assert not train_modules & test_modules
    train = load_examples("stdlib-code", num_examples=300)
    test = load_examples("stdlib-code:test", num_examples=50)
    assert {e.meta["module"] for e in train} <= train_modules
    assert {e.meta["module"] for e in test} <= test_modules
    assert all(e.kind == "text" and e.completion.strip() for e in train + test)
    assert [e.completion for e in test] == [e.completion for e in load_examples("stdlib-code:test", num_examples=50)]
    assert [e.completion for e in load_examples("stdlib-code", num_examples=20, seed=1)] != [
        e.completion for e in train[:20]]


def test_stdlib_chunks_keep_the_source():
    from lora_da.data.stdlib_code import chunk_source

    source = "".join(f"def f{i}(x):\n    return x + {i}\n\n" for i in range(100))
    chunks = chunk_source(source, chunk_chars=200)
    assert "".join(chunks) == source
    assert all(len(c) < 200 + 40 for c in chunks) and len(chunks) > 5
