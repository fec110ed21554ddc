import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class VectorMatrix(_message.Message):
    __slots__ = ("data", "dim", "rows")
    DATA_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    dim: int
    rows: int
    def __init__(self, data: _Optional[bytes] = ..., dim: _Optional[int] = ..., rows: _Optional[int] = ...) -> None: ...

class ItemStatus(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class MetadataValue(_message.Message):
    __slots__ = ("string_value", "number_value", "timestamp_value")
    STRING_VALUE_FIELD_NUMBER: _ClassVar[int]
    NUMBER_VALUE_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_VALUE_FIELD_NUMBER: _ClassVar[int]
    string_value: str
    number_value: float
    timestamp_value: _timestamp_pb2.Timestamp
    def __init__(self, string_value: _Optional[str] = ..., number_value: _Optional[float] = ..., timestamp_value: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Metadata(_message.Message):
    __slots__ = ("fields",)
    class FieldsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: MetadataValue
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[MetadataValue, _Mapping]] = ...) -> None: ...
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    fields: _containers.MessageMap[str, MetadataValue]
    def __init__(self, fields: _Optional[_Mapping[str, MetadataValue]] = ...) -> None: ...

class ValueList(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedCompositeFieldContainer[MetadataValue]
    def __init__(self, values: _Optional[_Iterable[_Union[MetadataValue, _Mapping]]] = ...) -> None: ...

class Range(_message.Message):
    __slots__ = ("gte", "gt", "lte", "lt")
    GTE_FIELD_NUMBER: _ClassVar[int]
    GT_FIELD_NUMBER: _ClassVar[int]
    LTE_FIELD_NUMBER: _ClassVar[int]
    LT_FIELD_NUMBER: _ClassVar[int]
    gte: MetadataValue
    gt: MetadataValue
    lte: MetadataValue
    lt: MetadataValue
    def __init__(self, gte: _Optional[_Union[MetadataValue, _Mapping]] = ..., gt: _Optional[_Union[MetadataValue, _Mapping]] = ..., lte: _Optional[_Union[MetadataValue, _Mapping]] = ..., lt: _Optional[_Union[MetadataValue, _Mapping]] = ...) -> None: ...

class Condition(_message.Message):
    __slots__ = ("key", "equals", "in_set", "range")
    KEY_FIELD_NUMBER: _ClassVar[int]
    EQUALS_FIELD_NUMBER: _ClassVar[int]
    IN_SET_FIELD_NUMBER: _ClassVar[int]
    RANGE_FIELD_NUMBER: _ClassVar[int]
    key: str
    equals: MetadataValue
    in_set: ValueList
    range: Range
    def __init__(self, key: _Optional[str] = ..., equals: _Optional[_Union[MetadataValue, _Mapping]] = ..., in_set: _Optional[_Union[ValueList, _Mapping]] = ..., range: _Optional[_Union[Range, _Mapping]] = ...) -> None: ...

class Filter(_message.Message):
    __slots__ = ("conditions",)
    CONDITIONS_FIELD_NUMBER: _ClassVar[int]
    conditions: _containers.RepeatedCompositeFieldContainer[Condition]
    def __init__(self, conditions: _Optional[_Iterable[_Union[Condition, _Mapping]]] = ...) -> None: ...

class SearchParams(_message.Message):
    __slots__ = ("nprobe", "ef_search")
    NPROBE_FIELD_NUMBER: _ClassVar[int]
    EF_SEARCH_FIELD_NUMBER: _ClassVar[int]
    nprobe: int
    ef_search: int
    def __init__(self, nprobe: _Optional[int] = ..., ef_search: _Optional[int] = ...) -> None: ...
