from clipsearch.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EmbedTextsRequest(_message.Message):
    __slots__ = ("texts",)
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    texts: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, texts: _Optional[_Iterable[str]] = ...) -> None: ...

class EmbedTextsResponse(_message.Message):
    __slots__ = ("embeddings", "model_fingerprint")
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    embeddings: _common_pb2.VectorMatrix
    model_fingerprint: str
    def __init__(self, embeddings: _Optional[_Union[_common_pb2.VectorMatrix, _Mapping]] = ..., model_fingerprint: _Optional[str] = ...) -> None: ...

class ImageInput(_message.Message):
    __slots__ = ("data", "uri")
    DATA_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    uri: str
    def __init__(self, data: _Optional[bytes] = ..., uri: _Optional[str] = ...) -> None: ...

class EmbedImagesRequest(_message.Message):
    __slots__ = ("images",)
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[ImageInput]
    def __init__(self, images: _Optional[_Iterable[_Union[ImageInput, _Mapping]]] = ...) -> None: ...

class EmbedImagesResponse(_message.Message):
    __slots__ = ("embeddings", "statuses", "model_fingerprint")
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    embeddings: _common_pb2.VectorMatrix
    statuses: _containers.RepeatedCompositeFieldContainer[_common_pb2.ItemStatus]
    model_fingerprint: str
    def __init__(self, embeddings: _Optional[_Union[_common_pb2.VectorMatrix, _Mapping]] = ..., statuses: _Optional[_Iterable[_Union[_common_pb2.ItemStatus, _Mapping]]] = ..., model_fingerprint: _Optional[str] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetModelInfoResponse(_message.Message):
    __slots__ = ("model_name", "pretrained", "dim", "device", "dtype", "model_fingerprint", "context_length", "image_size", "max_batch_size")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    PRETRAINED_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    pretrained: str
    dim: int
    device: str
    dtype: str
    model_fingerprint: str
    context_length: int
    image_size: int
    max_batch_size: int
    def __init__(self, model_name: _Optional[str] = ..., pretrained: _Optional[str] = ..., dim: _Optional[int] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., model_fingerprint: _Optional[str] = ..., context_length: _Optional[int] = ..., image_size: _Optional[int] = ..., max_batch_size: _Optional[int] = ...) -> None: ...
