"""Two agent frameworks no one here wrote, pointed at a live SmolLM2 server (spmd executor, a
Hermes-style chat template so tools reach the prompt): LangChain's ``ChatOpenAI`` with
``with_structured_output`` and ``bind_tools`` with a forced tool, and the OpenAI Agents SDK
running an agent with one function tool through its chat-completions model."""

from __future__ import annotations

from typing import Annotated

import pytest
from pydantic import Field
from smol_live import NAME, needs_smollm2, start_smol
from test_tool_calling import HERMES_TEMPLATE

pytestmark = [needs_smollm2, pytest.mark.anyio]
pytest.importorskip("flowserve_xgrammar")
pytest.importorskip("flowserve_tool_parsers")


@pytest.fixture(scope="module")
def smol(start_server, tmp_path_factory):
    template = tmp_path_factory.mktemp("template") / "hermes.jinja"
    template.write_text(HERMES_TEMPLATE)
    return start_smol(start_server, "-o", f"chat_template={template}")


def test_langchain_structured_output_and_a_forced_tool(smol):
    langchain_openai = pytest.importorskip("langchain_openai")
    from pydantic import BaseModel

    class City(BaseModel):
        """A city and the country it is in."""

        name: str = Field(max_length=24)
        country: str = Field(max_length=24)

    model = langchain_openai.ChatOpenAI(base_url=smol.base_url, api_key="unused", model=NAME, temperature=0,
                                        max_tokens=80, max_retries=0)
    city = model.with_structured_output(City).invoke("Name a city in Italy.")
    assert isinstance(city, City) and city.name and city.country

    def get_weather(city: str, unit: str) -> str:
        """The weather in a city, in celsius or fahrenheit."""
        return f"21 {unit} in {city}"

    message = model.bind_tools([get_weather], tool_choice="get_weather").invoke("How warm is it in Rome?")
    [call] = message.tool_calls
    assert call["name"] == "get_weather" and set(call["args"]) == {"city", "unit"}
    assert all(isinstance(v, str) for v in call["args"].values())


async def test_openai_agents_sdk_runs_an_agent_with_a_function_tool(smol):
    agents = pytest.importorskip("agents")
    from openai import AsyncOpenAI

    agents.set_tracing_disabled(True)  # nothing leaves this machine
    calls = []

    @agents.function_tool
    def get_weather(city: Annotated[str, Field(max_length=20)]) -> str:  # bounded: a 135M model rambles
        """The weather in a city."""
        calls.append(city)
        return f"It is sunny and 21 degrees in {city}."

    # closed inside this test's event loop: a client left to the garbage collector closes its
    # connections in whichever loop runs next, after this one is gone
    async with AsyncOpenAI(base_url=smol.base_url, api_key="unused", max_retries=0) as client:
        agent = agents.Agent(
            name="weather", instructions="Answer questions about the weather with the get_weather tool.",
            tools=[get_weather], model=agents.OpenAIChatCompletionsModel(model=NAME, openai_client=client),
            # the first turn must call the tool; the SDK resets the choice to auto after it ran
            model_settings=agents.ModelSettings(tool_choice="required", temperature=0, max_tokens=150))
        result = await agents.Runner.run(agent, "What is the weather in Paris?", max_turns=4)
    assert len(calls) == 1 and isinstance(calls[0], str) and calls[0], [r.output for r in result.raw_responses]
    assert isinstance(result.final_output, str) and result.final_output


async def test_openai_agents_sdk_through_the_responses_api(smol):
    """The SDK's default model speaks /v1/responses: function_call and function_call_output
    items go back and forth."""
    agents = pytest.importorskip("agents")
    from openai import AsyncOpenAI

    agents.set_tracing_disabled(True)
    calls = []

    @agents.function_tool
    def get_weather(city: Annotated[str, Field(max_length=20)]) -> str:
        """The weather in a city."""
        calls.append(city)
        return f"It is sunny and 21 degrees in {city}."

    async with AsyncOpenAI(base_url=smol.base_url, api_key="unused", max_retries=0) as client:
        agent = agents.Agent(
            name="weather", instructions="Answer questions about the weather with the get_weather tool.",
            tools=[get_weather], model=agents.OpenAIResponsesModel(model=NAME, openai_client=client),
            model_settings=agents.ModelSettings(tool_choice="required", temperature=0, max_tokens=150))
        result = await agents.Runner.run(agent, "What is the weather in Paris?", max_turns=4)
    assert len(calls) == 1 and calls[0]
    assert isinstance(result.final_output, str) and result.final_output
