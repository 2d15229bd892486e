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
