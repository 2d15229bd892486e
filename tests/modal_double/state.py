"""What the double keeps of the objects a client creates."""

from __future__ import annotations

from dataclasses import dataclass, field

from modal_proto import api_pb2


@dataclass
class App:
    app_id: str
    description: str
    environment: str
    name: str = ""  # set when published
    state: int = api_pb2.APP_STATE_INITIALIZING
    function_ids: dict[str, str] = field(default_factory=dict)
    class_ids: dict[str, str] = field(default_factory=dict)


@dataclass
class Named:
    """A Volume, Secret or Dict: looked up by name within an environment."""

    object_id: str
    name: str
    version: int = 0  # a Volume's
    env: dict[str, str] = field(default_factory=dict)  # a Secret's
    data: dict[bytes, bytes] = field(default_factory=dict)  # a Dict's, serialized
    files: dict[str, bytes] = field(default_factory=dict)  # a Volume's, by path without "/"


def function_data(definition: api_pb2.Function) -> api_pb2.FunctionData:
    """How the API answers with a function: its definition as the one ranked variant."""
    return api_pb2.FunctionData(
        function_name=definition.function_name,
        function_type=definition.function_type,
        is_class=definition.is_class,
        is_server=definition.is_server,
        ranked_functions=[api_pb2.FunctionData.RankedFunction(function=definition)],
    )
