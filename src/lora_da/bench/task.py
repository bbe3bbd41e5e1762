"""The benchmark's data: encoded train, validation and test splits, with a fingerprint for resuming."""

from __future__ import annotations

import functools
import hashlib
import json
import random
from dataclasses import dataclass

from lora_da.bench.config import BenchConfig
from lora_da.data import encode_examples, is_builtin, load_examples, parse_spec


@dataclass
class BenchTask:
    """Encoded splits of the benchmark data: train (fine-tuning + calibration), val (lr choice), test."""

    train: list[dict]
    val: list[dict]
    test: list[dict]
    test_examples: list  # raw Examples of the test split, for exact-match accuracy
    qa: bool

    @functools.cached_property
    def fingerprint(self) -> str:
        """Hash of the encoded splits: catches data that changed under the same name (e.g. stdlib-code of
        another Python version)."""
        digest = hashlib.sha256()
        for split in (self.train, self.val, self.test):
            for features in split:
                digest.update(json.dumps([list(map(int, features["input_ids"])),
                                          list(map(int, features["labels"]))]).encode())
            digest.update(b"|")
        return digest.hexdigest()[:16]


def load_bench_task(config: BenchConfig, tokenizer) -> BenchTask:
    """Built-in tasks: val is cut from the train split, test is the task's test split; JSONL: a seeded split."""
    if is_builtin(config.data):
        name, _ = parse_spec(config.data)
        train_all = load_examples(f"{name}:train", num_examples=config.num_train + config.num_val,
                                  seed=config.data_seed)
        train_raw, val_raw = train_all[: config.num_train], train_all[config.num_train :]
        test_raw = load_examples(f"{name}:test", num_examples=config.num_test, seed=config.data_seed)
    else:
        everything = list(load_examples(config.data))
        random.Random(config.data_seed).shuffle(everything)
        if len(everything) < config.num_val + config.num_test + 1:
            raise ValueError(
                f"{config.data} has {len(everything)} examples; need more than num_val + num_test = "
                f"{config.num_val + config.num_test}"
            )
        test_raw = everything[: config.num_test]
        val_raw = everything[config.num_test : config.num_test + config.num_val]
        train_raw = everything[config.num_test + config.num_val :][: config.num_train]
    if not val_raw:
        raise ValueError("the validation split is empty: raise num_val or provide more training examples")

    def encode(examples):
        return encode_examples(examples, tokenizer, max_length=config.max_length)

    qa = all(ex.is_qa for ex in test_raw)
    return BenchTask(encode(train_raw), encode(val_raw), encode(test_raw), list(test_raw), qa)
