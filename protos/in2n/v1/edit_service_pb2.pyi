from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_UINT8: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
DTYPE_UINT8: DType
DTYPE_FLOAT16: DType
DTYPE_FLOAT32: DType

class Image(_message.Message):
    __slots__ = ("height", "width", "channels", "dtype", "data")
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    height: int
    width: int
    channels: int
    dtype: DType
    data: bytes
    def __init__(self, height: _Optional[int] = ..., width: _Optional[int] = ..., channels: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ..., data: _Optional[bytes] = ...) -> None: ...

class EditRequest(_message.Message):
    __slots__ = ("request_id", "view_id", "render", "original", "instruction", "guidance_scale", "image_guidance_scale", "diffusion_steps", "lower_bound", "upper_bound", "seed", "client_id", "original_key", "timeout_ms")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    VIEW_ID_FIELD_NUMBER: _ClassVar[int]
    RENDER_FIELD_NUMBER: _ClassVar[int]
    ORIGINAL_FIELD_NUMBER: _ClassVar[int]
    INSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    DIFFUSION_STEPS_FIELD_NUMBER: _ClassVar[int]
    LOWER_BOUND_FIELD_NUMBER: _ClassVar[int]
    UPPER_BOUND_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    ORIGINAL_KEY_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    view_id: int
    render: Image
    original: Image
    instruction: str
    guidance_scale: float
    image_guidance_scale: float
    diffusion_steps: int
    lower_bound: float
    upper_bound: float
    seed: int
    client_id: str
    original_key: str
    timeout_ms: int
    def __init__(self, request_id: _Optional[str] = ..., view_id: _Optional[int] = ..., render: _Optional[_Union[Image, _Mapping]] = ..., original: _Optional[_Union[Image, _Mapping]] = ..., instruction: _Optional[str] = ..., guidance_scale: _Optional[float] = ..., image_guidance_scale: _Optional[float] = ..., diffusion_steps: _Optional[int] = ..., lower_bound: _Optional[float] = ..., upper_bound: _Optional[float] = ..., seed: _Optional[int] = ..., client_id: _Optional[str] = ..., original_key: _Optional[str] = ..., timeout_ms: _Optional[int] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("queue_ms", "compute_ms", "total_ms")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    compute_ms: float
    total_ms: float
    def __init__(self, queue_ms: _Optional[float] = ..., compute_ms: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...

class EditResponse(_message.Message):
    __slots__ = ("request_id", "view_id", "edited", "timings", "timestep")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    VIEW_ID_FIELD_NUMBER: _ClassVar[int]
    EDITED_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    TIMESTEP_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    view_id: int
    edited: Image
    timings: Timings
    timestep: int
    def __init__(self, request_id: _Optional[str] = ..., view_id: _Optional[int] = ..., edited: _Optional[_Union[Image, _Mapping]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., timestep: _Optional[int] = ...) -> None: ...

class EditError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class StreamEditRequest(_message.Message):
    __slots__ = ("edit",)
    EDIT_FIELD_NUMBER: _ClassVar[int]
    edit: EditRequest
    def __init__(self, edit: _Optional[_Union[EditRequest, _Mapping]] = ...) -> None: ...

class StreamEditResponse(_message.Message):
    __slots__ = ("request_id", "view_id", "edited", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    VIEW_ID_FIELD_NUMBER: _ClassVar[int]
    EDITED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    view_id: int
    edited: EditResponse
    error: EditError
    def __init__(self, request_id: _Optional[str] = ..., view_id: _Optional[int] = ..., edited: _Optional[_Union[EditResponse, _Mapping]] = ..., error: _Optional[_Union[EditError, _Mapping]] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DescribeResponse(_message.Message):
    __slots__ = ("backend", "model", "device", "precision", "max_image_side", "max_message_bytes", "max_diffusion_steps", "known_instructions", "server_version", "max_batch", "caches_originals", "defaults", "ignored_fields")
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_SIDE_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_DIFFUSION_STEPS_FIELD_NUMBER: _ClassVar[int]
    KNOWN_INSTRUCTIONS_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    CACHES_ORIGINALS_FIELD_NUMBER: _ClassVar[int]
    DEFAULTS_FIELD_NUMBER: _ClassVar[int]
    IGNORED_FIELDS_FIELD_NUMBER: _ClassVar[int]
    backend: str
    model: str
    device: str
    precision: str
    max_image_side: int
    max_message_bytes: int
    max_diffusion_steps: int
    known_instructions: _containers.RepeatedScalarFieldContainer[str]
    server_version: str
    max_batch: int
    caches_originals: bool
    defaults: EditDefaults
    ignored_fields: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, backend: _Optional[str] = ..., model: _Optional[str] = ..., device: _Optional[str] = ..., precision: _Optional[str] = ..., max_image_side: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., max_diffusion_steps: _Optional[int] = ..., known_instructions: _Optional[_Iterable[str]] = ..., server_version: _Optional[str] = ..., max_batch: _Optional[int] = ..., caches_originals: bool = ..., defaults: _Optional[_Union[EditDefaults, _Mapping]] = ..., ignored_fields: _Optional[_Iterable[str]] = ...) -> None: ...

class EditDefaults(_message.Message):
    __slots__ = ("guidance_scale", "image_guidance_scale", "diffusion_steps", "lower_bound", "upper_bound")
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    DIFFUSION_STEPS_FIELD_NUMBER: _ClassVar[int]
    LOWER_BOUND_FIELD_NUMBER: _ClassVar[int]
    UPPER_BOUND_FIELD_NUMBER: _ClassVar[int]
    guidance_scale: float
    image_guidance_scale: float
    diffusion_steps: int
    lower_bound: float
    upper_bound: float
    def __init__(self, guidance_scale: _Optional[float] = ..., image_guidance_scale: _Optional[float] = ..., diffusion_steps: _Optional[int] = ..., lower_bound: _Optional[float] = ..., upper_bound: _Optional[float] = ...) -> None: ...
