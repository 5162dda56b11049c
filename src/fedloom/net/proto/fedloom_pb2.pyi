from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TaskKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_KIND_UNSPECIFIED: _ClassVar[TaskKind]
    WAIT: _ClassVar[TaskKind]
    TRAIN: _ClassVar[TaskKind]
    DONE: _ClassVar[TaskKind]
    EVALUATE: _ClassVar[TaskKind]
TASK_KIND_UNSPECIFIED: TaskKind
WAIT: TaskKind
TRAIN: TaskKind
DONE: TaskKind
EVALUATE: TaskKind

class JoinRequest(_message.Message):
    __slots__ = ("client_name", "unsettled_round")
    CLIENT_NAME_FIELD_NUMBER: _ClassVar[int]
    UNSETTLED_ROUND_FIELD_NUMBER: _ClassVar[int]
    client_name: str
    unsettled_round: int
    def __init__(self, client_name: _Optional[str] = ..., unsettled_round: _Optional[int] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("client_id", "config_toml", "run_id", "max_message_bytes", "heartbeat_s", "population", "unsettled_accepted")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_TOML_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_S_FIELD_NUMBER: _ClassVar[int]
    POPULATION_FIELD_NUMBER: _ClassVar[int]
    UNSETTLED_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    client_id: int
    config_toml: str
    run_id: str
    max_message_bytes: int
    heartbeat_s: float
    population: int
    unsettled_accepted: bool
    def __init__(self, client_id: _Optional[int] = ..., config_toml: _Optional[str] = ..., run_id: _Optional[str] = ..., max_message_bytes: _Optional[int] = ..., heartbeat_s: _Optional[float] = ..., population: _Optional[int] = ..., unsettled_accepted: _Optional[bool] = ...) -> None: ...

class TaskRequest(_message.Message):
    __slots__ = ("wait_s", "held_digest")
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    HELD_DIGEST_FIELD_NUMBER: _ClassVar[int]
    wait_s: float
    held_digest: str
    def __init__(self, wait_s: _Optional[float] = ..., held_digest: _Optional[str] = ...) -> None: ...

class TaskReply(_message.Message):
    __slots__ = ("kind", "round", "broadcast_digest", "broadcast_bytes", "deadline_in_s", "message", "secagg_json", "broadcast_xxh3", "patch_base_digest", "broadcast")
    KIND_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    BROADCAST_DIGEST_FIELD_NUMBER: _ClassVar[int]
    BROADCAST_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_IN_S_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SECAGG_JSON_FIELD_NUMBER: _ClassVar[int]
    BROADCAST_XXH3_FIELD_NUMBER: _ClassVar[int]
    PATCH_BASE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    BROADCAST_FIELD_NUMBER: _ClassVar[int]
    kind: TaskKind
    round: int
    broadcast_digest: str
    broadcast_bytes: int
    deadline_in_s: float
    message: str
    secagg_json: str
    broadcast_xxh3: int
    patch_base_digest: str
    broadcast: bytes
    def __init__(self, kind: _Optional[_Union[TaskKind, str]] = ..., round: _Optional[int] = ..., broadcast_digest: _Optional[str] = ..., broadcast_bytes: _Optional[int] = ..., deadline_in_s: _Optional[float] = ..., message: _Optional[str] = ..., secagg_json: _Optional[str] = ..., broadcast_xxh3: _Optional[int] = ..., patch_base_digest: _Optional[str] = ..., broadcast: _Optional[bytes] = ...) -> None: ...

class DownloadRequest(_message.Message):
    __slots__ = ("round", "broadcast_digest", "patch_base_digest")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    BROADCAST_DIGEST_FIELD_NUMBER: _ClassVar[int]
    PATCH_BASE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    round: int
    broadcast_digest: str
    patch_base_digest: str
    def __init__(self, round: _Optional[int] = ..., broadcast_digest: _Optional[str] = ..., patch_base_digest: _Optional[str] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: UpdateHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[UpdateHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class UpdateHeader(_message.Message):
    __slots__ = ("round", "broadcast_digest", "total_bytes", "meta_json", "failure")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    BROADCAST_DIGEST_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    META_JSON_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    round: int
    broadcast_digest: str
    total_bytes: int
    meta_json: str
    failure: str
    def __init__(self, round: _Optional[int] = ..., broadcast_digest: _Optional[str] = ..., total_bytes: _Optional[int] = ..., meta_json: _Optional[str] = ..., failure: _Optional[str] = ...) -> None: ...

class UploadReply(_message.Message):
    __slots__ = ("accepted", "error")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    error: str
    def __init__(self, accepted: _Optional[bool] = ..., error: _Optional[str] = ...) -> None: ...

class SecAggRequest(_message.Message):
    __slots__ = ("round", "stage", "payload", "meta_json", "session")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    META_JSON_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    round: int
    stage: int
    payload: bytes
    meta_json: str
    session: str
    def __init__(self, round: _Optional[int] = ..., stage: _Optional[int] = ..., payload: _Optional[bytes] = ..., meta_json: _Optional[str] = ..., session: _Optional[str] = ...) -> None: ...

class SecAggReply(_message.Message):
    __slots__ = ("payload", "error")
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    error: str
    def __init__(self, payload: _Optional[bytes] = ..., error: _Optional[str] = ...) -> None: ...

class EvalReport(_message.Message):
    __slots__ = ("round", "model_digest", "num_examples", "loss", "metrics", "undefined", "unavailable")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MODEL_DIGEST_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    UNDEFINED_FIELD_NUMBER: _ClassVar[int]
    UNAVAILABLE_FIELD_NUMBER: _ClassVar[int]
    round: int
    model_digest: str
    num_examples: int
    loss: float
    metrics: _containers.ScalarMap[str, float]
    undefined: _containers.RepeatedScalarFieldContainer[str]
    unavailable: str
    def __init__(self, round: _Optional[int] = ..., model_digest: _Optional[str] = ..., num_examples: _Optional[int] = ..., loss: _Optional[float] = ..., metrics: _Optional[_Mapping[str, float]] = ..., undefined: _Optional[_Iterable[str]] = ..., unavailable: _Optional[str] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("phase",)
    PHASE_FIELD_NUMBER: _ClassVar[int]
    phase: str
    def __init__(self, phase: _Optional[str] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("round",)
    ROUND_FIELD_NUMBER: _ClassVar[int]
    round: int
    def __init__(self, round: _Optional[int] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("json",)
    JSON_FIELD_NUMBER: _ClassVar[int]
    json: str
    def __init__(self, json: _Optional[str] = ...) -> None: ...
