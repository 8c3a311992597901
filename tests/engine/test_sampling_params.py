"""SamplingParams: vLLM's fields checked with errors naming the field; which requests need the
logits processors."""

from __future__ import annotations

import pytest

from eaas import SamplingParams
from eaas.engine.params import StructuredOutputsParams
from eaas.errors import RequestError


def test_needs_processors_names_them():
    plain = SamplingParams(temperature=0.7, top_k=5, top_p=0.9, seed=1, n=4, stop=["x"])
    assert not plain.needs_processors
    for kw in ({"min_p": 0.1}, {"min_tokens": 1}, {"presence_penalty": 0.5},
               {"frequency_penalty": -0.5}, {"repetition_penalty": 1.1}, {"logit_bias": {1: 1}},
               {"logprobs": 0}, {"n": 1, "best_of": 2},
               {"structured_outputs": StructuredOutputsParams(json_object=True)}):
        assert SamplingParams(**kw).needs_processors, kw


@pytest.mark.parametrize("kw,field", [({"n": 0}, "n"), ({"n": 2, "best_of": 1}, "best_of"),
                                      ({"min_p": 1.5}, "min_p"), ({"min_tokens": 99}, "min_tokens"),
                                      ({"presence_penalty": 3}, "presence_penalty"),
                                      ({"repetition_penalty": 0}, "repetition_penalty"),
                                      ({"logit_bias": {1: 500}}, "logit_bias"),
                                      ({"stop": [""]}, "stop"), ({"logprobs": 21}, "logprobs"),
                                      ({"prompt_logprobs": -1}, "prompt_logprobs")])
def test_bad_params_name_their_field(kw, field):
    with pytest.raises(RequestError, match=f"SamplingParams.{field}="):
        SamplingParams(**kw)


def test_structured_outputs_needs_exactly_one_kind():
    with pytest.raises(RequestError, match="exactly one"):
        StructuredOutputsParams()
    with pytest.raises(RequestError, match="exactly one"):
        StructuredOutputsParams(regex="a", choice=["b"])
    with pytest.raises(RequestError, match="json"):
        StructuredOutputsParams(json="{not json")
    assert StructuredOutputsParams(json='{"type": "object"}').schema == {"type": "object"}
