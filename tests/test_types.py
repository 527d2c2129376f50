"""The request → job → task Structs: validation names the field; state machines refuse bad moves."""

import msgspec
import pytest

from flowserve_core.types import (
    DeploymentSpec,
    IllegalTransition,
    InstanceInfo,
    InstanceState,
    Job,
    Request,
    RequestState,
    SamplingParams,
    Task,
    TaskRole,
    TaskState,
    TokenEvent,
)


@pytest.mark.parametrize("field, value, words", [
    ("temperature", -0.5, "temperature must be >= 0"),
    ("top_p", 0.0, "top_p must be in (0, 1]"),
    ("top_p", 1.5, "top_p must be in (0, 1]"),
    ("max_tokens", 0, "max_tokens must be at least 1"),
    ("top_k", -2, "top_k must be"),
    ("logprobs", 21, "logprobs must be in [0, 20]"),
    ("presence_penalty", 3.0, "presence_penalty must be in [-2, 2]"),
    ("repetition_penalty", 0.0, "repetition_penalty must be > 0"),
    ("temperature", float("nan"), "temperature must be a finite number"),
    ("stop", [""], "stop must not contain empty strings"),
])
def test_sampling_params_reject_bad_values_naming_the_field(field, value, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
        SamplingParams(**{field: value})


def test_sampling_params_validate_when_decoded_from_json_too():
    with pytest.raises(msgspec.ValidationError, match="top_p must be in"):
        msgspec.json.decode(b'{"top_p": 2}', type=SamplingParams)
    with pytest.raises(msgspec.ValidationError, match=r"Expected `float`, got `str` - at `\$.temperature`"):
        msgspec.json.decode(b'{"temperature": "hot"}', type=SamplingParams)


def test_min_tokens_may_not_exceed_max_tokens():
    with pytest.raises(ValueError, match="min_tokens must not exceed max_tokens"):
        SamplingParams(max_tokens=3, min_tokens=4)


def test_request_state_machine():
    request = Request(prompt_token_ids=[1, 2])
    assert request.state is RequestState.WAITING
    request.move_to(RequestState.RUNNING)
    request.move_to(RequestState.FINISHED)
    with pytest.raises(IllegalTransition, match="finished -> running is not allowed"):
        request.move_to(RequestState.RUNNING)


def test_task_and_instance_state_machines():
    task = Task(request=Request(prompt_token_ids=[1]), role=TaskRole.PREFILL)
    with pytest.raises(IllegalTransition):
        task.move_to(TaskState.DONE)
    task.move_to(TaskState.RUNNING)
    task.move_to(TaskState.DONE)
    info = InstanceInfo()
    info.move_to(InstanceState.READY)
    info.move_to(InstanceState.DRAINING)
    with pytest.raises(IllegalTransition, match="draining -> ready"):
        info.move_to(InstanceState.READY)
    info.move_to(InstanceState.GONE)


def test_structs_round_trip_through_msgpack():
    job = Job(request=Request(prompt_token_ids=[5, 6], params=SamplingParams(temperature=0.0)))
    job.tasks.append(Task(job_id=job.id, request=job.request, role=TaskRole.DECODE))
    again = msgspec.msgpack.decode(msgspec.msgpack.encode(job), type=Job)
    assert again == job and again.tasks[0].role is TaskRole.DECODE
    event = TokenEvent(task_id="t", token_ids=[1], finish_reason="length")
    assert msgspec.json.decode(msgspec.json.encode(event), type=TokenEvent) == event


def test_deployment_spec_checks_bounds():
    with pytest.raises(ValueError, match=r"max_instances \(1\) must be >= min_instances \(2\)"):
        DeploymentSpec(min_instances=2, max_instances=1)
    with pytest.raises(msgspec.ValidationError, match="unknown field `executer`"):
        msgspec.convert({"executer": "spmd"}, DeploymentSpec)
