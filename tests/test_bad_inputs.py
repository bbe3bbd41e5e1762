"""What the library and the command do with bad inputs: one clear line, the right exit status, and nothing on
disk that looks like a finished run. Future changes keep this matrix green (issue 22).

The command cases are one table (`CLI_CASES`): each names its input, the one-line message, the exit status and
what must be left on disk. Python API cases follow it.
"""

from __future__ import annotations

import pytest
import torch
from _tiny import all_weights, batches, examples, tiny_llama, wrap

from lora_da import LoraDAConfig, LoraDAError, initialize_lora_da

CFG = LoraDAConfig(population_size=100, show_progress=False)
TWO_PASSES = 7  # layers per pass: the tiny Llama's 14 target layers in two passes over the data


class OneIterator:
    """An iterable that hands out the same iterator each time: spent after the first pass."""

    def __init__(self, items):
        self._iterator = iter(items)

    def __iter__(self):
        return self._iterator


class OtherDataEachTime:
    """An iterable that gives other examples each time it is iterated."""

    def __init__(self):
        self.passes = 0

    def __iter__(self):
        self.passes += 1
        return iter(batches(examples(4, seed=self.passes), 2))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (lambda: OneIterator(batches(examples(4), 2)), "Pass 2 of 2: iterating `batches` again yielded nothing"),
        (OtherDataEachTime, "Pass 2 of 2 over `batches` saw other examples than pass 1"),
    ],
    ids=["same-spent-iterator", "other-data-per-pass"],
)
def test_passes_over_data_that_is_not_the_same_are_refused(data, message):
    model = wrap(tiny_llama())
    before = all_weights(model)
    with pytest.raises(LoraDAError, match=message):
        initialize_lora_da(model, data(), CFG, layers_per_pass=TWO_PASSES)
    after = all_weights(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
